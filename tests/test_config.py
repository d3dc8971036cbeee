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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.synth.size=7", "key 'data.synth.size': must be even and > 0, got 7"),
        ("data.mining.val_fraction=2", "key 'data.mining.val_fraction': must be in [0, 1]"),
        ("shards.jpeg_quality=0", "key 'shards.jpeg_quality': must be in [1, 100], got 0"),
        ("model.dropout=1", "key 'model.dropout': must be in [0, 1), got 1.0"),
        ("queue.size=-1", "key 'queue.size': must be >= 0, got -1"),
        ("optim.lr=0", "key 'optim.lr': must be > 0, got 0.0"),
        ("eval.ks=[0,5]", "key 'eval.ks': ranks must be >= 1, got [0, 5]"),
        ("train.global_batch_size=-8", "key 'train.global_batch_size': must be >= 0, got -8"),
        ("train.batch_size=0", "key 'train.batch_size': must be > 0"),
        ("sampler.beta=1.5", "key 'sampler.beta': must be in [0, 1]"),
        ("augment.hflip=1.5", "key 'augment.hflip': must be in [0, 1]"),
        ("augment.shift=-2", "key 'augment.shift': must be >= 0"),
        ("augment.target_frames=-1", "key 'augment.target_frames': must be >= 0"),
        # choices: the `Literal` fields, checked by OmegaConf
        (
            "deepspeed.zero_stage=5",
            "override: key 'deepspeed.zero_stage': Invalid value '5', expected one of [0, 1, 2, 3]",
        ),
        ("sampler.kind=hard", "override: key 'sampler.kind'"),
        ("model.reduce=sum", "override: key 'model.reduce': Invalid value 'sum'"),
    ],
)
def test_each_section_checks_its_values_and_names_the_full_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)


def test_the_reference_loss_refuses_a_queue():
    assert load_config(None, ["loss.hn_nce=reference"]).loss.hn_nce == "reference"
    with pytest.raises(ConfigError, match="key 'loss.hn_nce': 'reference' has no queue"):
        load_config(None, ["loss.hn_nce=reference", "queue.size=64"])
    with pytest.raises(ConfigError, match="key 'loss.hn_nce'"):
        load_config(None, ["loss.hn_nce=lavis"])


def test_what_a_field_is_for_is_marked_on_it():
    import hashlib

    from configs.schema import ModelConfig, ShardConfig, marked
    from sharding.pack import FRAME_RULE, _fingerprint
    from train.resume import is_free

    packing = ["epoch", "samples_per_shard", "query_frames", "target_frames", "frame_size"]
    packing += ["frame_format", "jpeg_quality", "target_channels", "seed"]
    assert marked(ShardConfig, "packing") == packing  # in this order: the shards' fingerprint
    cfg = ShardConfig(samples_per_shard=4)
    h = hashlib.sha256(b"rows")
    h.update(FRAME_RULE.encode())  # shards packed under another frame choice are packed again
    for k in packing:
        h.update(f"{k}={getattr(cfg, k)}".encode())
    assert _fingerprint(b"rows", cfg) == h.hexdigest()[:16]  # every packed shard set keeps its id
    assert _fingerprint(b"rows", ShardConfig(samples_per_shard=4, workers=7)) == h.hexdigest()[:16]
    assert marked(ModelConfig, "export_override") == [
        "freeze_vision",
        "train_target_encoder",
        "combiner",
        "reduce",
        "dropout",
        "vision_drop_path",
    ]
    free = marked(Config, "resume_free")
    assert {"tracking.uri", "eval.ks", "train.chunk_size", "data.synth.workers"} <= set(free)
    assert is_free("train.max_steps") and is_free("tracking.experiment")
    assert not is_free("train.batch_size") and not is_free("model.dropout")
    assert not is_free("optim.lr") and not is_free("shards.samples_per_shard")


def test_an_export_refuses_overrides_of_its_own_weights(tmp_path):
    from tests.tiny import tiny_model
    from train.export import export_model, load_exported

    model, tok = tiny_model(tmp_path / "tok")
    export_model(model.state_dict(), model.cfg, tok, tmp_path / "export")
    assert load_exported(tmp_path / "export", combiner="avg")[0].cfg.combiner == "avg"
    with pytest.raises(ValueError, match=r"model.embed_dim cannot change .* these can: freeze"):
        load_exported(tmp_path / "export", embed_dim=8)


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
