"""The typed configuration tree. Sections are added as the packages that read them land."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class SynthConfig:
    """The synthetic video corpus (data.synthetic)."""

    videos: int = 1000
    family_size: int = 5  # videos sharing the uncaptioned attributes (position, size, speed)
    frames: int = 16
    fps: int = 8
    size: int = 64  # square frame side in pixels (even, for yuv420p)
    workers: int = 2
    seed: int = 1234


@dataclass
class MiningConfig:
    """Triplet mining from a caption table (data.mining)."""

    max_videos_per_caption: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 1234


@dataclass
class FilterConfig:
    """Metadata filter (data.filtering): keep a triplet iff author or categories match."""

    by_author: bool = True
    by_category: bool = True


@dataclass
class DataConfig:
    root: str = "runs/demo/corpus"  # corpus directory: videos/, captions.csv, {train,val,test}.csv
    synth: SynthConfig = field(default_factory=SynthConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, validated against the schema."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_describe(err)}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override must be key=value: {bad[0]!r}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"override: {_describe(err)}") from None
    return OmegaConf.to_object(merged)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (for logging as params, for manifests)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
