"""Configuration: one typed tree, read from the YAML files beside this module.

`schema.py` holds the dataclasses (the only place a setting and its default are declared);
`load_config` merges a YAML file and `key=value` overrides onto them and turns OmegaConf's
errors into one `ConfigError` naming the file and the offending key.
"""

from configs.schema import Config, ConfigError, load_config, to_dict

__all__ = ["Config", "ConfigError", "load_config", "to_dict"]
