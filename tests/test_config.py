import pytest

from configs import Config, ConfigError, load_config, to_dict


def test_defaults_yaml_and_overrides(tmp_path):
    assert isinstance(load_config(), Config)
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  synth:\n    videos: 42\n")
    cfg = load_config(path, ["data.synth.seed=9", "data.mining.val_fraction=0.3"])
    assert (cfg.data.synth.videos, cfg.data.synth.seed, cfg.data.mining.val_fraction) == (
        42,
        9,
        0.3,
    )
    assert to_dict(cfg)["data"]["synth"]["videos"] == 42


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  synth:\n    vidoes: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'data.synth.vidoes'"):
        load_config(path)


def test_unknown_override_and_wrong_type_name_the_key():
    with pytest.raises(ConfigError, match=r"key 'data.nope'"):
        load_config(None, ["data.nope=1"])
    with pytest.raises(ConfigError, match=r"key 'data.synth.videos'.*'many'"):
        load_config(None, ["data.synth.videos=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.synth.videos"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_bad_values_name_the_key():
    with pytest.raises(
        ConfigError,
        match=r"key 'deepspeed.zero_stage': Invalid value '5', expected one of \[0, 1, 2, 3\]",
    ):
        load_config(None, ["deepspeed.zero_stage=5"])
    with pytest.raises(ConfigError, match=r"key 'sampler.kind'"):
        load_config(None, ["sampler.kind=hard"])
    with pytest.raises(ConfigError, match=r"key 'train.batch_size': must be > 0"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"key 'sampler.beta'"):
        load_config(None, ["sampler.beta=1.5"])
    with pytest.raises(ConfigError, match=r"key 'model.reduce': Invalid value 'sum'"):
        load_config(None, ["model.reduce=sum"])
    with pytest.raises(ConfigError, match=r"key 'augment.hflip': must be in \[0, 1\]"):
        load_config(None, ["augment.hflip=1.5"])
    with pytest.raises(ConfigError, match=r"key 'augment.shift': must be >= 0"):
        load_config(None, ["augment.shift=-2"])
    with pytest.raises(ConfigError, match=r"key 'augment.target_frames': must be >= 0"):
        load_config(None, ["augment.target_frames=-1"])


def test_choices_live_on_their_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stage: pretrain\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'train.stage': .*\['covr', 'itc'\]"):
        load_config(path)
    # frame counts have one source, the shards section
    with pytest.raises(ConfigError, match=r"key 'model.target_frames'"):
        load_config(None, ["model.target_frames=3"])


@pytest.mark.parametrize("name", ["demo.yaml", "covr2_blip2.yaml", "covr_blip.yaml"])
def test_shipped_configs_load(name):
    from configs.schema import CONFIG_DIR

    cfg = load_config(CONFIG_DIR / name)
    if name != "demo.yaml":  # the real recipes (docs/RECIPES.md)
        assert cfg.optim.weight_decay == 0.05 and cfg.train.epochs == 5 and cfg.train.seed == 1234
        assert cfg.optim.lr == (2e-5 if "blip2" in name else 1e-5)
        assert cfg.train.global_batch_size == (
            512 if "blip2" in name else 1024
        )  # 2 GPUs x 256 | 512
