"""A damaged export (a part missing, a file cut short, a config that does not parse), a broken
`model.pretrained` or tokenizer directory: one error naming the file, before any model is built
(never a freshly initialised part evaluated with exit 0)."""

import json
import shutil

import pytest

from data.tokenizer import TokenizerError, load_tokenizer
from tests.conftest import ROOT
from tests.test_launch import one_line_error, run
from tests.tiny import tiny_model
from train.export import ExportError, export_model, load_exported
from train.models import UnreadableWeights, build_model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, tok = tiny_model(root / "tok")  # a frozen target path: target_encoder.pt written
    return export_model(model.state_dict(), model.cfg, tok, root / "export")


def _copy(export, tmp_path):
    return shutil.copytree(export, tmp_path / "copy")


def test_an_intact_export_loads_and_lists_its_files(export):
    files = json.loads((export / "covr_config.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "combiner.pt", "target_encoder.pt"} <= set(files)
    load_exported(export)


@pytest.mark.parametrize("part", ["combiner.pt", "target_encoder.pt", "config.json"])
def test_a_missing_part_is_named(export, tmp_path, part):
    damaged = _copy(export, tmp_path)
    (damaged / part).unlink()
    with pytest.raises(ExportError, match=rf"{part}: missing \(the export is incomplete\)"):
        load_exported(damaged)


def test_a_file_cut_short_is_named_by_its_size_or_its_header(export, tmp_path):
    damaged = _copy(export, tmp_path)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ExportError, match=r"model.safetensors: 1000 bytes, the export wrote"):
        load_exported(damaged)
    config = json.loads((damaged / "covr_config.json").read_text())
    del config["files"]  # an export from before the file list: the header is still read
    (damaged / "covr_config.json").write_text(json.dumps(config))
    with pytest.raises(UnreadableWeights, match=r"model.safetensors: unreadable safetensors"):
        load_exported(damaged)
    shutil.copy(export / "model.safetensors", weights)
    (damaged / "combiner.pt").write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match=r"combiner.pt: unreadable"):
        load_exported(damaged)


def test_a_config_that_does_not_parse_or_has_unknown_keys_is_named(export, tmp_path):
    damaged = _copy(export, tmp_path)
    (damaged / "covr_config.json").write_text('{"arch": "blip2",')
    with pytest.raises(ExportError, match=r"covr_config.json: not valid JSON"):
        load_exported(damaged)
    config = json.loads((export / "covr_config.json").read_text()) | {"future_key": 1}
    (damaged / "covr_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"covr_config.json: .*future_key"):
        load_exported(damaged)


def test_launch_eval_on_a_damaged_export_is_one_line(export, tmp_path):
    damaged = _copy(export, tmp_path)
    (damaged / "combiner.pt").unlink()
    proc = run(
        ROOT / "launch/eval.py",
        "--protocol",
        "webvid-covr",
        "--checkpoint",
        damaged,
        "--data",
        tmp_path,
        check=False,
    )
    one_line_error(proc, "export error", "combiner.pt: missing")


def test_a_broken_pretrained_or_tokenizer_directory_is_named(export, tmp_path):
    model, tok = tiny_model(tmp_path / "tok")
    pretrained = tmp_path / "pretrained"
    model.hf.save_pretrained(pretrained)
    cfg = model.cfg
    cfg.pretrained = str(pretrained)
    build_model(cfg, tok)  # intact
    (pretrained / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UnreadableWeights, match=r"pretrained/model.safetensors: unreadable"):
        build_model(cfg, tok)
    (pretrained / "model.safetensors").unlink()
    with pytest.raises(UnreadableWeights, match=r"no weights \(model.safetensors"):
        build_model(cfg, tok)
    (pretrained / "config.json").unlink()
    with pytest.raises(UnreadableWeights, match=r"no config.json"):
        build_model(cfg, tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty: not a readable tokenizer directory"):
        load_tokenizer(tmp_path / "empty")


def test_an_export_trained_with_its_target_encoder_loads_with_a_frozen_target(tmp_path):
    """No target_encoder.pt (the export's weights encode targets); a next stage that freezes
    its target path starts it from those weights."""
    model, tok = tiny_model(tmp_path / "tok", train_target_encoder=True)
    out = export_model(model.state_dict(), model.cfg, tok, tmp_path / "export")
    assert not (out / "target_encoder.pt").exists()
    loaded, _ = load_exported(out, train_target_encoder=False)
    assert loaded.frozen_target is not None
