"""Evaluating what exists: a test split with dead links packed and evaluated as a subset, image
benchmarks with missing files; coverage beside every recall, dropped items listed, tagged."""

import json
import shutil
from pathlib import Path

import pytest

from configs.schema import ShardConfig
from data.benchmarks import CompositionQuery
from data.webvid_covr import MissingVideosError, read_annotations
from eval.coverage import image_subset, shard_coverage
from sharding.pack import pack
from sharding.writer import NO_QUERY_LEFT
from tests.tiny import tiny_model

CFG = ShardConfig(samples_per_shard=4, target_frames=3, workers=1)


def _files(root: Path, names) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        (root / f"{n}.png").write_bytes(b"x")
        out[n] = root / f"{n}.png"
    return out


def test_image_subset_drops_every_query_touching_a_missing_image(tmp_path):
    gallery = _files(tmp_path, "abcdef")
    queries = [
        CompositionQuery("0", "a", "x", target="b", subset=["a", "b", "c"]),
        CompositionQuery("1", "c", "x", target="d"),  # its target is missing
        CompositionQuery("2", "e", "x", target="b", subset=["e", "b", "f"]),  # a member missing
        CompositionQuery("3", "b", "x", targets=["a", "c"]),  # CIRCO-like: several targets
    ]
    gallery["d"].unlink()
    gallery["f"].unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 6 image\(s\) missing.*--subset"):
        image_subset(queries, gallery, subset=False)
    kept, kept_gallery, cov = image_subset(queries, gallery, subset=True)
    assert [q.query_id for q in kept] == ["0", "3"]
    assert sorted(kept_gallery) == ["a", "b", "c", "e"]
    assert (cov.queries_kept, cov.queries_total, cov.gallery_kept, cov.gallery_total) == (
        2,
        4,
        4,
        6,
    )
    assert cov.subset
    assert cov.metrics() == pytest.approx({"queries_coverage": 50.0, "gallery_coverage": 400 / 6})
    assert [d["query"] for d in cov.dropped_queries] == ["1", "2"]
    assert "d" in cov.dropped_queries[0]["reason"] and "f" in cov.dropped_queries[1]["reason"]
    assert [d["item"] for d in cov.dropped_gallery] == ["d", "f"]
    # nothing missing: the whole split, not a subset
    _, _, whole = image_subset(queries[:1], {k: gallery[k] for k in "abc"}, subset=True)
    assert not whole.subset and whole.metrics()["queries_coverage"] == 100.0


def test_shard_coverage_reads_totals_and_losses_from_the_manifest():
    manifest = {
        "source_counts": {"records": 10, "triplets": 12, "targets": 10},
        "totals": {"samples": 8, "skipped_records": 2},
        "skipped": [
            {"key": "v1", "video": "t1", "reason": "t1: cannot open", "rows": [3, 4]},
            {"key": "v2", "row": 7, "video": "q7", "reason": "q7: file not found"},
            {"key": "v2", "video": "t2", "reason": NO_QUERY_LEFT, "rows": []},
        ],
    }
    cov = shard_coverage(manifest, queries_kept=8, gallery_kept=8)
    assert (cov.queries_kept, cov.queries_total, cov.gallery_total) == (8, 10, 10)
    assert [d["query"] for d in cov.dropped_queries] == ["row 3", "row 4", "row 7"]
    assert [d["item"] for d in cov.dropped_gallery] == ["t1", "t2"]
    old = {"totals": {"samples": 8, "skipped_records": 2}, "skipped": []}  # no source_counts
    assert shard_coverage(old, 8, 8).queries_total == 10


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from train.export import export_model

    root = tmp_path_factory.mktemp("coverage_model")
    model, tok = tiny_model(root / "tok", "blip2")
    export_model(model.state_dict(), model.cfg, tok, root / "export")
    return root / "export", model, tok


def _evaluate(export, model, tok, shards: Path, out: Path, uri: str) -> dict:
    from eval.run import EvalJob, evaluate
    from train.tracking import Tracker

    job = EvalJob("webvid-covr", str(export), str(shards), str(out), split="test", progress=False)
    tracker = Tracker(uri, "covr-eval", out, "eval")
    result = evaluate(job, model, tok, tracker)
    tracker.finish()
    return result


def test_test_split_with_a_dead_link_is_refused_or_packed_and_evaluated_as_a_subset(
    small_corpus, exported, tmp_path
):
    from mlflow import MlflowClient

    root, _ = small_corpus
    videos = tmp_path / "videos"
    shutil.copytree(root / "videos", videos)
    rows = read_annotations(root / "test.csv")
    victim = rows[0].pth1
    next(videos.glob(f"**/{Path(victim).name}.mp4")).unlink()
    with pytest.raises(MissingVideosError, match="--subset"):
        pack(root / "test.csv", videos, tmp_path / "refused", CFG)
    shards = tmp_path / "test"
    manifest = pack(root / "test.csv", videos, shards, CFG, subset=True)
    targets = {t.pth2 for t in rows}
    # a target is lost with its own video, or when every one of its queries was the victim
    lost = {p for p in targets if p == victim or all(t.pth1 == victim for t in rows if t.pth2 == p)}
    assert manifest["subset"] and manifest["source_counts"]["targets"] == len(targets)
    assert lost and manifest["totals"]["samples"] == len(targets) - len(lost)

    export, model, tok = exported
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = _evaluate(export, model, tok, shards, tmp_path / "eval", uri)
    kept = len(targets) - len(lost)
    assert result["subset"] is True
    assert result["coverage"]["queries"] == f"{kept}/{len(targets)}"
    assert result["coverage"]["gallery"] == f"{kept}/{len(targets)}"
    assert result["metrics"]["queries_coverage"] == pytest.approx(100 * kept / len(targets))
    dropped = json.loads((tmp_path / "eval" / "dropped.json").read_text())
    assert {d["item"] for d in dropped["gallery"]} == lost
    victim_rows = {f"row {i}" for i, t in enumerate(rows) if victim in (t.pth1, t.pth2)}
    assert {d["query"] for d in dropped["queries"]} >= victim_rows
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["covr.subset"] == "true"
    assert "webvid-covr/test/recall_at_1" not in run.data.metrics  # never under the full name
    assert run.data.metrics["webvid-covr/test-subset/recall_at_1"] == pytest.approx(
        result["metrics"]["R@1"]
    )
    assert run.data.metrics["webvid-covr/test-subset/queries_coverage"] < 100

    whole = pack(root / "test.csv", root / "videos", tmp_path / "whole" / "test", CFG)
    full = _evaluate(export, model, tok, tmp_path / "whole" / "test", tmp_path / "e2", uri)
    assert not whole["subset"] and full["subset"] is False
    assert full["coverage"]["queries"] == f"{len(targets)}/{len(targets)}"
    assert not (tmp_path / "e2" / "dropped.json").exists()


def _fashioniq_root(root: Path) -> None:
    from PIL import Image

    for cat in ("dress", "shirt"):
        names = [f"{cat}{i}" for i in range(14)]
        for i, n in enumerate(names):
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (10 * i, 0, 0)).save(root / "images" / f"{n}.png")
        caps = [
            {"candidate": names[i], "target": names[i + 1], "captions": ["is red.", "has dots"]}
            for i in range(6)
        ]
        for sub, body in (("captions", caps), ("image_splits", names)):
            (root / sub).mkdir(exist_ok=True)
            name = f"cap.{cat}.val.json" if sub == "captions" else f"split.{cat}.val.json"
            (root / sub / name).write_text(json.dumps(body))


def test_launch_eval_subset_on_an_image_benchmark_with_a_missing_image(exported, tmp_path):
    import subprocess
    import sys

    export, _, _ = exported
    _fashioniq_root(tmp_path / "fiq")
    (tmp_path / "fiq" / "images" / "dress3.png").unlink()  # q2's target, q3's candidate
    cmd = [sys.executable, "launch/eval.py", "--protocol", "fashioniq", "--checkpoint"]
    cmd += [str(export), "--data", str(tmp_path / "fiq"), "--categories", "dress,shirt"]
    cmd += ["--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    repo = Path(__file__).resolve().parents[1]
    refused = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "1 of 14 image(s) missing" in refused.stderr and "--subset" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = subprocess.run(cmd + ["--subset"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SUBSET: 10 of 12 queries (83.3%), 27 of 28 gallery items" in done.stderr
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["subset"] and result["coverage"]["queries"] == "10/12"
    assert result["metrics"]["gallery_coverage"] == pytest.approx(100 * 27 / 28)
    dropped = json.loads((tmp_path / "out" / "dropped.json").read_text())
    assert [d["query"] for d in dropped["queries"]] == ["dress-2", "dress-3"]
    assert [d["item"] for d in dropped["gallery"]] == ["dress3"]


def test_evaluation_text_tokens_are_a_setting_checked_against_the_model(exported, tmp_path):
    import subprocess
    import sys

    from configs import ConfigError, load_config

    export, model, _ = exported
    _fashioniq_root(tmp_path / "fiq")
    cmd = [sys.executable, "launch/eval.py", "--protocol", "fashioniq", "--checkpoint"]
    cmd += [str(export), "--data", str(tmp_path / "fiq"), "--categories", "dress"]
    cmd += ["--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    repo = Path(__file__).resolve().parents[1]
    too_long = model.cfg.text.max_position_embeddings + 1
    done = subprocess.run(
        [*cmd, "--text-tokens", str(too_long)], cwd=repo, capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"evaluation text tokens {too_long} do not fit" in done.stderr.strip().splitlines()[-1]
    done = subprocess.run([*cmd, "--text-tokens", "16"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["conventions"]["text_tokens"] == (
        "pre_caption to 30 words, longest padding, at most 16 tokens"
    )
    with pytest.raises(ConfigError, match="eval.text_tokens"):
        load_config(None, ["eval.text_tokens=0"])
