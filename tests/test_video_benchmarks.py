"""TF-CoVR and EgoCVR (several targets per query, per-query galleries): their files as
published, the metrics on hand-computed cases (ties, repeated gallery items, repeated and
missing targets, galleries too small), CIRCO's query text option, and `launch/eval.py
--protocol all` over real mp4 clips with MLflow."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.benchmarks import BenchmarkFormatError
from data.video_benchmarks import numbers_as_words, read_egocvr, read_tfcovr
from eval import video_protocols
from eval.metrics import map_at_k, pessimistic_order, recall_any_at_k
from eval.protocols import EvalSettings
from tests.conftest import ROOT
from tests.tiny import tiny_model


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _clips(video_dir: Path, names, source: Path | None = None) -> None:
    video_dir.mkdir(parents=True, exist_ok=True)
    for n in names:
        if source is None:
            (video_dir / f"{n}.mp4").touch()
        else:
            shutil.copy(source, video_dir / f"{n}.mp4")


TF_HEADER = ["query_id", "query_video", "target_video", "modification", "target_videos_ids"]


def tfcovr_root(tmp_path: Path, source: Path | None = None) -> Path:
    root = tmp_path / "tfcovr"
    _write_csv(
        root / "annotations" / "test_finegd.csv",
        TF_HEADER,
        [
            [0, "a", "b", "Do 2.5 twists, not 1!", "['b', 'x']"],  # x: not in the gallery
            [1, "c", "c", "land on 1.0 feet", "['d', 'd']"],  # d listed twice
            [2, "d", "c", "from 10 meters", "['b']"],
            [3, "e", "d", "turn", "['d']"],
        ],
    )
    _clips(root / "FineGD_videos", "abcde", source)
    return root


EGO_HEADER = [
    "video_clip_id",
    "target_clip_ids",
    "video_clip_narration",
    "target_clip_narration",
    "instruction",
    "modified_captions",
    "global_idx",
    "local_idx",
]


def egocvr_root(tmp_path: Path, source: Path | None = None) -> Path:
    root = tmp_path / "egocvr"
    # rows 1 and 3 are the same clip (the real file repeats 3,250 rows)
    _write_csv(
        root / "egocvr_data.csv",
        ["clip_name", "narration_text", "video_uid"],
        [[n, f"#C {n}", "v1"] for n in ("a", "b", "c", "b", "d", "e")],
    )
    _write_csv(
        root / "egocvr_annotations_gallery.csv",
        EGO_HEADER,
        [
            ["a", "['b']", "", "", "cut the onion", "a person cuts", "[1, 2, 3, 4]", "[1, 2]"],
            ["c", "['d', 'e']", "", "", "stir", "a person stirs", "[0, 4, 5]", "[4]"],
            ["d", "['a']", "", "", "pour", "a person pours", "[0, 1]", "[0, 1]"],
        ],
    )
    _clips(root / "clips", "abcde", source)
    return root


# --- reading the published layouts --------------------------------------------------------------


def test_tf_covr_numbers_are_written_as_its_test_writes_them():
    assert numbers_as_words("2.5 twists, 1 or 1.0, 7, 0.5, 10, 3.25") == (
        "two and a half twists, one or one, seven, half, 10, 3.25"
    )


def test_read_tfcovr_keeps_the_gallery_rows_and_every_target_list(tmp_path):
    bench = read_tfcovr(tfcovr_root(tmp_path))
    assert bench.gallery == ["b", "c", "c", "d"]  # one per row, repeats kept
    q = bench.queries
    assert [x.targets for x in q] == [["b", "x"], ["d", "d"], ["b"], ["d"]]
    assert q[0].caption == "do two and a half twists, not one"  # numbers, then cleaned
    assert q[2].caption == "from 10 meters"
    assert set(bench.clips) == set("abcde")


def test_tfcovr_files_that_are_not_in_the_format_are_named(tmp_path):
    root = tfcovr_root(tmp_path)
    path = root / "annotations" / "test_finegd.csv"
    _write_csv(path, TF_HEADER, [[0, "a", "b", "x", "b, c"]])
    with pytest.raises(BenchmarkFormatError, match=r"test_finegd.csv:2: target_videos_ids is not"):
        read_tfcovr(root)
    _write_csv(path, TF_HEADER[:-1], [[0, "a", "b", "x"]])
    with pytest.raises(BenchmarkFormatError, match=r"no column\(s\) \['target_videos_ids'\]"):
        read_tfcovr(root)
    _write_csv(path, TF_HEADER, [[0, "a", "zz", "x", "['zz']"]])
    with pytest.raises(FileNotFoundError, match=r"1 of 2 clips missing under .*zz.mp4"):
        read_tfcovr(root)
    with pytest.raises(FileNotFoundError, match="no val_finegd.csv in .*annotations or "):
        read_tfcovr(root, "val")


def test_read_egocvr_keeps_gallery_rows_and_credits_a_clips_last_row(tmp_path):
    bench = read_egocvr(egocvr_root(tmp_path))
    q = bench.queries
    assert q[0].extra["global"] == ["b", "c", "d"] and q[0].subset == ["b", "c"]
    assert q[1].targets == ["d", "e"] and q[1].subset == ["d"]
    assert [x.caption for x in q] == ["cut the onion", "stir", "pour"]
    assert read_egocvr(tmp_path / "egocvr", text="modified_captions").queries[0].caption == (
        "a person cuts"
    )
    # the gallery ranks rows as the official script does: b, listed twice, twice; a target
    # clip is credited at its last row (b: row 3)
    assert bench.gallery == ["a", "b", "c", "b", "d", "e"]
    assert q[0].extra["global_rows"] == [1, 2, 3, 4] and q[0].extra["local_rows"] == [1, 2]
    assert q[0].extra["target_rows"] == [3] and q[1].extra["target_rows"] == [4, 5]


def test_egocvr_bad_files_are_named(tmp_path):
    root = egocvr_root(tmp_path)
    rows = list(csv.reader((root / "egocvr_annotations_gallery.csv").open()))
    rows[1][6] = "[1, 99]"
    _write_csv(root / "egocvr_annotations_gallery.csv", rows[0], rows[1:])
    with pytest.raises(BenchmarkFormatError, match=r":2: global_idx holds a row .* \(6 rows\)"):
        read_egocvr(root)
    (root / "egocvr_annotations_gallery.csv").unlink()
    with pytest.raises(FileNotFoundError, match="gallery file .* downloaded apart"):
        read_egocvr(root)
    with pytest.raises(ValueError, match="query text must be one of"):
        read_egocvr(root, text="caption")
    with pytest.raises(FileNotFoundError, match="no egocvr_data.csv in .*annotation/egocvr"):
        read_egocvr(tmp_path / "nowhere")


# --- metrics by hand ----------------------------------------------------------------------------


def test_map_at_k_counts_repeated_gallery_items_and_missing_or_repeated_targets():
    # a ranked gallery holding c twice: both count; x is not in the gallery but is counted
    assert map_at_k([["b", "c", "c", "d"]], [["c", "x"]], ks=(4,))[4] == pytest.approx(
        100 * (1 / 2 + 2 / 3) / 2
    )
    assert map_at_k([["d", "b"]], [["d", "d"]], ks=(5,))[5] == pytest.approx(50.0)
    assert map_at_k([["a"]], [[]], ks=(5,))[5] == 0.0


def test_ties_never_earn_credit():
    scores = [0.5, 0.5, 0.5, 0.1]
    assert pessimistic_order(scores, [True, False, False, False]).tolist() == [1, 2, 0, 3]
    assert pessimistic_order([0.2, 0.9], [True, False]).tolist() == [1, 0]
    assert recall_any_at_k([["a", "b"], ["c"]], [["b", "z"], ["y"]], ks=(1, 2)) == {
        1: 0.0,
        2: 50.0,
    }


# --- the protocols on embeddings chosen by hand -------------------------------------------------

VECTORS = {
    "tf": {  # gallery clips; queries by their reference clip
        "clips": {
            "a": (0, 0, 1),
            "b": (1, 0, 0),
            "c": (0.8, 0.6, 0),
            "d": (0, 1, 0),
            "e": (0, 0, 1),
        },
        "queries": [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 0)],
    },
    "ego": {
        "clips": {
            "a": (1, 0, 0, 0),
            "b": (0, 1, 0, 0),
            "c": (0, 0, 1, 0),
            "d": (0, 0, 0, 1),
            "e": (0.5, 0.5, 0.5, 0.5),
        },
        "queries": [(0, 0.5, 0.9, 0.1), (0.3, 0.3, 0.3, 0.4), (0.2, 0.2, 0, 0)],
    },
}


@pytest.fixture
def chosen(monkeypatch):
    def use(name):
        v = VECTORS[name]

        def fake(model, tok, queries, clips, gallery, s, frames):
            q = torch.tensor(v["queries"], dtype=torch.float32)[:, None]
            g = torch.tensor([v["clips"][c] for c in gallery], dtype=torch.float32)[:, None]
            return q, g

        monkeypatch.setattr(video_protocols, "embed_clips", fake)

    return use


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model, tok = tiny_model(tmp_path_factory.mktemp("tok"))
    return model.eval(), tok


def test_tfcovr_by_hand(tmp_path, chosen, tiny):
    chosen("tf")
    root = tfcovr_root(tmp_path)
    s = EvalSettings(ks=(1, 5))
    ev = video_protocols.tfcovr(*tiny, root, settings=s)
    # q0 ranks b c c d; targets [b, x]: AP = 1 / min(K, 2)
    # q1 (own clip c removed) ranks d b; targets [d, d]: AP@5 = 1 / 2, AP@1 = 1
    # q2 (own clip d removed): b, c, c all score 0; target b ranks last of the tie: 1/3
    # q3 (own clip e is no gallery row) ranks d (1), then b, c, c (0); target d
    assert ev.top_ids[0] == ["b", "c", "c", "d"] and ev.top_ids[1] == ["d", "b"]
    assert ev.top_ids[2] == ["c", "c", "b"]
    assert ev.metrics["mAP@5"] == pytest.approx(100 * (0.5 + 0.5 + 1 / 3 + 1) / 4)
    assert ev.metrics["mAP@1"] == pytest.approx(100 * (1 + 1 + 0 + 1) / 4)
    # R@K of the row's target_video b, c, c, d: q1's is its own clip, removed, never found
    assert ev.metrics["R@1"] == pytest.approx(75.0) and ev.metrics["R@5"] == pytest.approx(75.0)
    assert "repeats kept" in ev.conventions["gallery"]

    unique = video_protocols.tfcovr(*tiny, root, settings=s, gallery_rule="unique")
    assert unique.gallery_ids == ["b", "c", "d"] and unique.top_ids[2] == ["c", "b"]
    assert unique.metrics["mAP@5"] == pytest.approx(100 * (0.5 + 0.5 + 0.5 + 1) / 4)


def test_egocvr_by_hand(tmp_path, chosen, tiny):
    chosen("ego")
    ev = video_protocols.egocvr(*tiny, egocvr_root(tmp_path))
    m = ev.metrics
    # global: q0 c, then b's rows 1 and 3 tied (the credited row 3 last), d; q1 e first
    # (targets d, e); q2 a, b tie: b first, a at 2
    assert ev.top_ids[0] == ["c", "b", "b", "d"] and ev.top_ids[2] == ["b", "a"]
    assert m["global_R@1"] == pytest.approx(100 / 3) and m["global_R@5"] == pytest.approx(100)
    # local: q1's gallery has one row: left out; q0's holds b's row 1 only, not the credited
    # row 3: never a hit (as officially); q2 the tie again
    assert m["local_queries"] == 2 and m["global_queries"] == 3
    assert m["local_R@1"] == 0.0 and m["local_R@2"] == pytest.approx(50)
    assert ev.conventions["query_text"] == "instruction"


def test_circo_query_text_convention(tmp_path, tiny, monkeypatch):
    from eval import protocols

    seen = []

    def fake_search(model, tok, queries, gallery, s, k, exclude):
        seen.append([q.caption for q in queries])
        raise StopIteration  # the text is all this test needs

    monkeypatch.setattr(protocols, "_search_images", fake_search)
    root = tmp_path / "circo"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "images" / "000000000001.jpg").touch()
    entry = {
        "id": 0,
        "reference_img_id": 1,
        "target_img_id": 1,
        "gt_img_ids": [1],
        "relative_caption": "is red",
        "shared_concept": "a car",
    }
    (root / "annotations" / "val.json").write_text(json.dumps([entry]))
    for text in ("relative", "concept"):
        with pytest.raises(StopIteration):
            protocols.circo(
                *tiny, root, image_dir=root / "images", settings=EvalSettings(circo_text=text)
            )
    assert seen == [["is red"], ["find a car but is red"]]
    with pytest.raises(ValueError, match="unknown circo_text"):
        protocols.circo(*tiny, root, settings=EvalSettings(circo_text="both"))


def test_circo_map_gives_a_tie_no_credit(tmp_path, tiny, monkeypatch):
    import numpy as np

    from data.benchmarks import CompositionQuery
    from eval import protocols
    from eval.coverage import full

    queries = [CompositionQuery("0", "r", "x", "t", ["t"])]
    gallery = {g: tmp_path / f"{g}.jpg" for g in ("a", "t", "b")}

    def fake_search(model, tok, queries, gallery, s, k, exclude):
        found = (list(gallery), None, None, np.array([[0.5, 0.5, 0.1]]), [["t", "a", "b"]])
        return queries, gallery, full(1, 3), found

    monkeypatch.setattr(protocols, "read_circo", lambda *a: (queries, gallery))
    monkeypatch.setattr(protocols, "_search_images", fake_search)
    ev = protocols.circo(*tiny, tmp_path, settings=EvalSettings(ks=(1, 5)))
    assert ev.metrics["mAP@1"] == 0.0 and ev.metrics["mAP@5"] == pytest.approx(50.0)
    assert ev.metrics["R@1"] == 0.0  # R@K: pessimistic as everywhere


# --- every benchmark present, through the launcher, on real clips -------------------------------


@pytest.mark.e2e
def test_launch_eval_protocol_all_writes_one_table_and_mlflow_names(small_corpus, tmp_path):
    from mlflow import MlflowClient

    from configs.schema import ShardConfig
    from sharding.pack import pack
    from train.export import export_model

    root, _ = small_corpus
    video = next((root / "videos").rglob("*.mp4"))
    data = tmp_path / "benchmarks"
    tfcovr_root(data, video)
    egocvr_root(data, video)
    pack(
        root / "test.csv",
        root / "videos",
        data / "webvid-covr" / "test",
        ShardConfig(samples_per_shard=4, target_frames=3, workers=1),
    )
    model, tok = tiny_model(tmp_path / "tok")
    export_model(model.state_dict(), model.cfg, tok, tmp_path / "export")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [
        sys.executable,
        "launch/eval.py",
        "--protocol",
        "all",
        "--checkpoint",
        str(tmp_path / "export"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "all"),
        "--tracking-uri",
        uri,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "all" / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows == ["webvid-covr", "tfcovr", "egocvr"]  # those present, in a fixed order
    assert "mAP@50" in table and "local_R@3" in table
    assert "Not evaluated (no data): dense-webvid-covr" in table  # what was looked for, named
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    run = MlflowClient(uri).get_run(results[0]["mlflow_run_id"])
    assert {r["mlflow_run_id"] for r in results} == {run.info.run_id}  # one run for all
    names = set(run.data.metrics)
    assert {
        "tfcovr/test/mAP_at_50",
        "egocvr/test/global_recall_at_1",
        "egocvr/test/local_recall_at_3",
        "webvid-covr/test/recall_at_1",
    } <= names
    assert run.data.metrics["tfcovr/test/mAP_at_50"] == pytest.approx(
        results[1]["metrics"]["mAP@50"]
    )
    assert run.data.params["eval.egocvr.query_text"] == "instruction"
    assert run.data.tags["covr.subset.tfcovr"] == "false" and "covr.subset" not in run.data.tags
    assert run.info.status == "FINISHED"

    # one benchmark's data broken: the others are still scored, the broken one named, exit 2
    (data / "egocvr" / "egocvr_annotations_gallery.csv").unlink()
    broken = cmd[:9] + [str(tmp_path / "broken")] + cmd[10:]
    done = subprocess.run(broken, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "FAILED egocvr:" in done.stderr and "egocvr_annotations_gallery.csv" in done.stderr
    table = (tmp_path / "broken" / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows == ["webvid-covr", "tfcovr"]
    assert "FAILED egocvr:" in table
    results = json.loads((tmp_path / "broken" / "results.json").read_text())
    run = MlflowClient(uri).get_run(results[0]["mlflow_run_id"])
    assert "egocvr_annotations_gallery.csv" in run.data.tags["covr.failed.egocvr"]
    refused = subprocess.run([*cmd, "--split", "val"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--split and --image-root name one" in refused.stderr
    empty = subprocess.run(
        cmd[:7] + [str(tmp_path)] + cmd[8:], cwd=ROOT, capture_output=True, text=True
    )
    assert empty.returncode == 2 and "no benchmark under" in empty.stderr
