"""Dense-WebVid-CoVR: its test file in the published layout (annotations/
dense-webvid8m-covr_test.csv: index, pth1, pth2, edit, and the query video's description as
`caption`; no txt1 / txt2 / scores), packed and evaluated with long edits and descriptions."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs.schema import ShardConfig, load_config
from data.webvid_covr import AnnotationError, read_annotations
from sharding.pack import pack
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
CFG = ShardConfig(samples_per_shard=4, target_frames=3, workers=1)
LONG = (
    "Instead of the calm morning light, show the same scene at night, with the street lamps on, "
    'a "neon" sign glowing — café ☕ — and the camera slowly panning to the left'
)


def _dense_csv(small_corpus, out: Path) -> tuple[Path, list]:
    root, _ = small_corpus
    rows = read_annotations(root / "test.csv")
    path = out / "dense-webvid8m-covr_test.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "pth1", "pth2", "edit", "caption"])
        for i, t in enumerate(rows):
            description = f"{t.txt1}, seen from a fixed camera over {i + 1} seconds"
            w.writerow([i, t.pth1, t.pth2, f"{t.edit}. {LONG}", description])
    return path, rows


def test_the_published_test_file_packs_with_long_edits_and_descriptions(
    small_corpus, tmp_path, caplog
):
    path, rows = _dense_csv(small_corpus, tmp_path)
    with caplog.at_level("WARNING"):
        triplets = read_annotations(path)
    assert len(triplets) == len(rows) and len(triplets[0].edit.split()) > 31
    assert triplets[0].description.endswith("over 1 seconds") and triplets[0].scores == []
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "no column txt1" in warning and "txt2: no target captions" in warning
    # the split comes from the published file name; every query kept (test), no captions
    manifest = pack(path, small_corpus[0] / "videos", tmp_path / "test", CFG)
    assert manifest["split"] == "test" and not manifest["subset"]
    assert manifest["source_counts"]["captions"] == 0
    targets = {t.pth2 for t in rows}
    assert manifest["source_counts"]["targets"] == len(targets)
    # without captions each target is its own sampler group (not one group of "")
    groups = set()
    for shard in sorted((tmp_path / "test").glob("*.tar")):
        import tarfile

        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    groups |= {t["group"] for t in meta["triplets"]}
    assert groups == targets


def test_tricky_rows_of_the_published_layout_name_file_and_line(tmp_path):
    path = tmp_path / "dense-webvid8m-covr_test.csv"
    path.write_text('index,pth1,pth2,edit,caption\n0,a/1,a/2,"an edit, quoted",d\n1,a/1,a/3,,d\n')
    with pytest.raises(AnnotationError, match=r"covr_test.csv:3: empty column 'edit'"):
        read_annotations(path)
    path.write_text('index,pth1,edit,caption\n0,a/1,"x",d\n')
    with pytest.raises(AnnotationError, match=r"covr_test.csv:1: missing column\(s\) \['pth2'\]"):
        read_annotations(path)
    path.write_text('index,pth1,pth2,edit,caption\n0,a/1,a/2,"open quote,d\n1,a/1,a/3,x,d\n')
    with pytest.raises(AnnotationError, match="covr_test.csv:2"):
        read_annotations(path)


@pytest.mark.parametrize("description", ["ignore", "separate"])
def test_evaluation_with_descriptions_through_the_model(small_corpus, tmp_path, description):
    from eval.run import EvalJob, evaluate
    from train.export import export_model
    from train.tracking import Tracker

    path, rows = _dense_csv(small_corpus, tmp_path)
    pack(path, small_corpus[0] / "videos", tmp_path / "test", CFG)
    model, tok = tiny_model(
        tmp_path / "tok", description=description, description_tokens=48, max_text_len=60
    )
    export_model(model.state_dict(), model.cfg, tok, tmp_path / "export")
    job = EvalJob(
        "webvid-covr",
        str(tmp_path / "export"),
        str(tmp_path / "test"),
        str(tmp_path / "eval"),
        split="test",
        progress=False,
        text_len=60,
    )
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "covr-eval", tmp_path / "eval", "eval")
    result = evaluate(job, model, tok, tracker)
    tracker.finish()
    conventions = json.loads((tmp_path / "eval" / "results.json").read_text())["conventions"]
    assert conventions["description"].startswith(description)
    assert "separate" not in description or "at most 48 tokens" in conventions["description"]
    assert "at most 60 tokens" in conventions["text_tokens"]
    assert result["coverage"]["queries"] == f"{len({t.pth2 for t in rows})}/" + str(
        len({t.pth2 for t in rows})
    )


def test_training_refuses_the_caption_term_on_shards_without_captions(small_corpus, tmp_path):
    path, _ = _dense_csv(small_corpus, tmp_path)
    pack(path, small_corpus[0] / "videos", tmp_path / "shards" / "train", CFG, split="train")
    sys.path.insert(0, str(ROOT / "launch"))
    from _bootstrap import PreflightError, preflight

    cfg = load_config(None, [f"shards.dir={tmp_path / 'shards'}", "loss.caption_weight=0.5"])
    with pytest.raises(PreflightError, match="key 'loss.caption_weight'.*no txt2"):
        preflight(cfg, ("train",))
    preflight(load_config(None, [f"shards.dir={tmp_path / 'shards'}"]), ("train",))


def test_launch_shard_packs_the_published_file(small_corpus, tmp_path):
    path, _ = _dense_csv(small_corpus, tmp_path)
    proc = subprocess.run(
        [sys.executable, ROOT / "launch/shard.py", "pack", "--annotations", path]
        + ["--video-root", small_corpus[0] / "videos", "--out", tmp_path / "out"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has no column txt1" in proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["split"] == "test"


def test_the_description_reaches_the_evaluated_queries(small_corpus, tmp_path):
    """Same weights: the separate description moves every query embedding, not the gallery."""
    import torch

    from eval.protocols import EvalSettings, webvid_covr

    path, _ = _dense_csv(small_corpus, tmp_path)
    pack(path, small_corpus[0] / "videos", tmp_path / "test", CFG)
    model, tok = tiny_model(tmp_path / "tok", description="separate", max_text_len=60)
    model.eval()
    settings = EvalSettings(progress=False, text_len=60)
    described = webvid_covr(model, tok, tmp_path / "test", settings)
    model.cfg.description = "ignore"
    plain = webvid_covr(model, tok, tmp_path / "test", settings)
    assert torch.equal(described.gallery_emb, plain.gallery_emb)
    moved = (described.query_emb - plain.query_emb).flatten(1).abs().amax(1)
    assert (moved > 1e-5).all()


def test_dense_webvid_covr_is_a_protocol_with_long_edits(small_corpus, tmp_path):
    from eval.run import EvalJob, run_protocol

    path, _ = _dense_csv(small_corpus, tmp_path)
    pack(path, small_corpus[0] / "videos", tmp_path / "test", CFG)
    model, tok = tiny_model(tmp_path / "tok")
    model.eval()
    job = EvalJob("dense-webvid-covr", "unused", str(tmp_path / "test"), progress=False)
    assert job.text_len == 128  # the protocol's own default; webvid-covr keeps 64
    assert EvalJob("webvid-covr", "unused", "x").text_len == 64
    with pytest.raises(ValueError, match="text tokens 128 do not fit the model's 64"):
        run_protocol(job, model, tok)  # the tiny model's 64 positions: one clear line
    job.text_len = 64
    evaluation = run_protocol(job, model, tok)
    assert evaluation.protocol == "dense-webvid-covr" and "R@1" in evaluation.metrics
