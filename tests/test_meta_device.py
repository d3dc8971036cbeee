"""Every path that runs the model, with the model on `meta` standing in for a GPU: validation in
training, `launch/eval.py` for each protocol (with the report and the explanations), and the
embed step. An input left on the CPU stops the run as a CUDA device mismatch would."""

import json
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from configs.schema import ShardConfig
from sharding.batch import Task
from tests.conftest import CIRR_ROOT
from tests.meta_device import MetaStandsForGPU
from tests.tiny import tiny_model

META = torch.device("meta")
ROOT = Path(__file__).resolve().parent.parent


def _image(path: Path, seed: int, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from train.export import export_model

    root = tmp_path_factory.mktemp("meta_model")
    torch.manual_seed(0)
    model, tok = tiny_model(root / "tok", "blip2", combiner="mlp")
    export_model(model.state_dict(), model.cfg, tok, root / "export")
    return root / "export"


@pytest.fixture(scope="module")
def packed(small_corpus, tmp_path_factory):
    from sharding.pack import pack

    root, _ = small_corpus
    out = tmp_path_factory.mktemp("meta_shards") / "val"
    pack(root / "test.csv", root / "videos", out, ShardConfig(samples_per_shard=4, workers=1))
    return out


def test_the_stand_in_refuses_cpu_operands_and_answers_host_reads(tmp_path):
    model, tok = tiny_model(tmp_path)
    model.eval().to(META)
    frames = torch.zeros(2, 1, 3, 32, 32)
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    with MetaStandsForGPU() as mode, torch.no_grad():
        with pytest.raises(RuntimeError, match="device"):
            model(Task.ENCODE_QUERY, frames, ids, mask)  # the inputs left on the CPU
        query = model(Task.ENCODE_QUERY, frames.to(META), ids.to(META), mask.to(META))
        before = mode.host_reads  # the model's own reads of meta values (device syncs on a GPU)
        assert query.device == META and query.cpu().shape == query.shape
        assert query.sum().item() == 1 and mode.host_reads == before + 2


def _eval_on_meta(monkeypatch, exported, tmp_path, protocol, data, **job):
    """`launch/eval.py`'s run with the model placed on `meta` where it would go to the GPU."""
    import train.engine
    from eval.run import EvalJob

    monkeypatch.setattr(sys, "path", [*sys.path, str(ROOT / "launch")])  # its _bootstrap
    from launch.eval import run

    monkeypatch.setattr(train.engine, "model_device", lambda: META)
    placed = []
    from train import export

    load = export.load_exported

    def load_and_watch(path):
        model, tok = load(path)
        placed.append(model)
        return model, tok

    monkeypatch.setattr(export, "load_exported", load_and_watch)
    with MetaStandsForGPU() as mode:
        out = str(tmp_path / "eval")
        results, _ = run([EvalJob(protocol, str(exported), str(data), out, progress=False, **job)])
        result = results[0]
    assert placed and next(placed[0].parameters()).device == META
    assert mode.host_reads > 0  # the protocol's embeddings came from the model on meta
    return result


def test_webvid_covr_with_report_and_explanations(monkeypatch, exported, packed, tmp_path):
    result = _eval_on_meta(
        monkeypatch, exported, tmp_path, "webvid-covr", packed, report=2, explain=1, batch_size=4
    )
    assert "R@1" in result["metrics"] and result["queries"] > 0
    names = {Path(f).name for f in result["files"]}
    assert any(n.startswith("explain_") and n.endswith(".png") for n in names)
    assert any(n.endswith(".html") or n.endswith(".png") for n in names - {"explain_0.png"})


def _mini_cirr(root: Path, n: int = 6) -> None:
    """The first `n` real CIRR val queries, their images drawn at random."""
    entries = json.loads((CIRR_ROOT / "captions" / "cap.rc2.val.json").read_text())[:n]
    names = json.loads((CIRR_ROOT / "image_splits" / "split.rc2.val.json").read_text())
    used = {
        m for e in entries for m in [e["reference"], e["target_hard"], *e["img_set"]["members"]]
    }
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(entries))
    split = {k: v for k, v in names.items() if k in used}
    (root / "image_splits" / "split.rc2.val.json").write_text(json.dumps(split))
    for name, rel in split.items():
        _image(root / "img_raw" / rel, zlib.crc32(name.encode()))


def test_cirr_with_explanations(monkeypatch, exported, tmp_path):
    _mini_cirr(tmp_path / "cirr")
    result = _eval_on_meta(
        monkeypatch, exported, tmp_path, "cirr", tmp_path / "cirr", explain=1, report=2
    )
    assert "Rsubset@1" in result["metrics"] and result["queries"] == 6


def test_fashioniq(monkeypatch, exported, tmp_path):
    names = [f"dress{i}" for i in range(6)]
    for i, name in enumerate(names):
        _image(tmp_path / "fiq" / "images" / f"{name}.png", i)
    caps = [
        {"candidate": names[i], "target": names[i + 1], "captions": ["red", "long"]}
        for i in range(4)
    ]
    (tmp_path / "fiq" / "captions").mkdir()
    (tmp_path / "fiq" / "image_splits").mkdir()
    (tmp_path / "fiq" / "captions" / "cap.dress.val.json").write_text(json.dumps(caps))
    (tmp_path / "fiq" / "image_splits" / "split.dress.val.json").write_text(json.dumps(names))
    result = _eval_on_meta(
        monkeypatch, exported, tmp_path, "fashioniq", tmp_path / "fiq", categories=("dress",)
    )
    assert "dress/R@10" in result["metrics"]


def test_circo(monkeypatch, exported, tmp_path):
    images = tmp_path / "circo" / "COCO2017_unlabeled" / "unlabeled2017"
    for i in range(1, 9):
        _image(images / f"{i:012d}.jpg", i)
    entry = {"relative_caption": "make it red", "shared_concept": "a thing"}
    val = [
        {"id": q, "reference_img_id": q + 1, "target_img_id": q + 2, **entry}
        | {"gt_img_ids": [q + 2, q + 3]}
        for q in range(3)
    ]
    (tmp_path / "circo" / "annotations").mkdir()
    (tmp_path / "circo" / "annotations" / "val.json").write_text(json.dumps(val))
    result = _eval_on_meta(monkeypatch, exported, tmp_path, "circo", tmp_path / "circo")
    assert "mAP@10" in result["metrics"]


def test_validation_in_training_runs_on_the_engine_module(exported, packed):
    """The loop validates `engine.module`, which DeepSpeed has put on the GPU."""
    from configs.schema import Config
    from sharding.reader import open_shards
    from train.export import load_exported
    from train.loop import validate

    model, tok = load_exported(exported)
    model.eval().to(META)
    cfg = Config()
    cfg.shards.dir = str(packed.parent)
    cfg.eval.batch_size = 4
    engine = SimpleNamespace(module=model)
    val = open_shards(packed)
    job = SimpleNamespace(cfg=cfg, engine=engine, tok=tok, rank=0, world=1, val=val)
    with MetaStandsForGPU() as mode:
        evaluation = validate(job)
    assert "R@1" in evaluation.metrics and mode.host_reads > 0


def test_embed_targets_on_the_model_device(monkeypatch, packed, tmp_path):
    import train.engine
    from configs.schema import Config
    from train.embedder import embed_targets

    monkeypatch.setattr(train.engine, "model_device", lambda: META)
    cfg = Config()
    # the tiny model the other tests build, as a config
    from data.tokenizer import build_vocab_tokenizer
    from tests.tiny import WORDS, tiny_model_config

    build_vocab_tokenizer([WORDS], tmp_path / "tok")
    cfg.model = tiny_model_config("blip2")
    cfg.model.tokenizer = str(tmp_path / "tok")
    with MetaStandsForGPU() as mode:
        manifests = embed_targets(cfg, packed, tmp_path / "embedded")
    assert manifests["val"]["totals"]["samples"] > 0 and mode.host_reads > 0
