"""Evaluation: FAISS search, protocol metrics, CIRR on its real annotations, reports."""

import html
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.metrics import recall_at_k
from eval.protocols import subset_credits, subset_recall
from eval.search import IndexSpec, recall_from_topk, retrieve, topk_agreement
from eval.similarity import similarity
from tests.conftest import CIRR_ROOT
from tests.multirank import run_ranks
from tests.tiny import tiny_model

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cirr"


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_faiss_exact_search_equals_brute_force():
    q, g = _unit(64, 4, 16), _unit(500, 4, 16, seed=1)
    for reduce in ("mean", "max"):
        full = similarity(q, g, reduce)
        scores, ids = retrieve(q, g, 20, reduce, candidates=500)
        top = full.topk(20)
        assert np.array_equal(ids, top.indices.numpy())
        np.testing.assert_allclose(scores, top.values.numpy(), atol=1e-5)


def test_excluded_items_are_never_retrieved_and_recall_matches_the_full_matrix():
    q, g = _unit(50, 16), _unit(80, 16, seed=2)
    positives = np.arange(50)
    exclude = [[(i + 1) % 80] for i in range(50)]
    scores, ids = retrieve(q, g, 79, exclude=exclude)
    assert not any(exclude[i][0] in ids[i] for i in range(50))
    full = (q @ g.t()).clone()
    for i, (j,) in enumerate(exclude):
        full[i, j] = float("-inf")
    expected = recall_at_k(full, positives, (1, 5, 10, 50))
    got = recall_from_topk(ids, positives, (1, 5, 10, 50), scores)
    assert got == pytest.approx(expected)


def test_topk_recall_is_pessimistic_under_ties():
    ids = np.array([[3, 1, 2], [0, 1, 2]])
    scores = np.array([[1.0, 1.0, 0.5], [0.9, 0.8, 0.7]])
    # query 0: positive 1 ties with item 3 -> rank 1, not 0; query 1: positive absent
    assert recall_from_topk(ids, [1, 5], (1, 2), scores) == {1: 0.0, 2: 50.0}


def test_ivf_and_hnsw_report_agreement_with_exact():
    q, g = _unit(100, 32), _unit(4000, 32, seed=3)
    exact = retrieve(q, g, 10)[1]
    hnsw = retrieve(q, g, 10, spec=IndexSpec("hnsw"))[1]
    ivf_all = retrieve(q, g, 10, spec=IndexSpec("ivf", nlist=16, nprobe=16))[1]  # every cell
    ivf_one = retrieve(q, g, 10, spec=IndexSpec("ivf", nlist=16, nprobe=1))[1]
    assert topk_agreement(exact, ivf_all) == 100.0
    assert topk_agreement(exact, hnsw) > 90.0
    assert topk_agreement(exact, ivf_one) < 100.0
    with pytest.raises(ValueError, match="unknown index kind"):
        IndexSpec("lsh")


def test_subset_recall_hand_computed():
    members = [["a", "b", "c"], ["a", "b", "c"], ["a", "b", "c"]]
    scores = [[0.1, 0.9, 0.3], [0.5, 0.5, 0.1], [0.2, 0.1, 0.0]]
    # ranks of the targets: b first (0); b ties a (pessimistic 1); c last (2)
    got = subset_recall(scores, members, [{"b": 1.0}, {"b": 1.0}, {"c": 1.0}])
    assert got == pytest.approx({"Rsubset@1": 100 / 3, "Rsubset@2": 200 / 3, "Rsubset@3": 100.0})


def test_subset_recall_soft_credit_differs_from_hard_hand_computed():
    from data.benchmarks import CompositionQuery

    def query(target, soft):
        return CompositionQuery("q", "ref", "edit", target, extra={"target_soft": soft})

    queries = [
        query("b", {"a": 1.0, "b": 1.0}),  # a (top-1) is correct too
        query("c", {"c": 1.0, "b": 0.5, "a": -1.0}),  # b (top-1) half correct, a wrong
        query("a", {"a": -1.0}),  # target_hard marked wrong: soft credits nothing, not -1
    ]
    members = [["a", "b", "c"]] * 3
    scores = [[0.9, 0.5, 0.1], [0.2, 0.8, 0.4], [0.9, 0.1, 0.0]]
    # subset rankings a b c | b c a | a b c
    hard = subset_recall(scores, members, subset_credits(queries, "hard"))
    soft = subset_recall(scores, members, subset_credits(queries, "soft"))
    # hard: q0 b at 2nd, q1 c at 2nd, q2 a at 1st
    assert hard == pytest.approx({"Rsubset@1": 100 / 3, "Rsubset@2": 100.0, "Rsubset@3": 100.0})
    # soft: q0 1 (a) at K=1; q1 .5 (b) at K=1, 1 (c) from K=2; q2 0 (max(0, -1))
    assert soft == pytest.approx({"Rsubset@1": 50.0, "Rsubset@2": 200 / 3, "Rsubset@3": 200 / 3})
    with pytest.raises(ValueError, match="cirr_subset_credit"):
        subset_credits(queries, "graded")


def _embed_owned(rank, world, out):
    import torch.distributed as dist

    from eval.embed import distributed_embed

    dist.init_process_group("gloo", rank=rank, world_size=world)

    calls, read, read_at_call = [], [0], []

    def items():
        for i in range(11):
            read[0] += 1
            yield i

    def embed(indices):
        calls.extend(indices)
        read_at_call.append(read[0])
        x = torch.tensor(indices, dtype=torch.float32)[:, None]
        return x * 2, x.expand(-1, 3) + 1  # two outputs, e.g. queries and gallery

    doubled, plus_one = distributed_embed(items(), embed, batch_size=4, rank=rank, world=world)
    torch.save(
        {"result": doubled, "plus_one": plus_one, "calls": calls, "read_at_call": read_at_call},
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_distributed_embedding_embeds_each_item_once_in_order_streaming(tmp_path):
    run_ranks(_embed_owned, 2, (str(tmp_path),))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    calls = parts[0]["calls"] + parts[1]["calls"]
    assert sorted(calls) == list(range(11))  # once each, no padding duplicates
    assert parts[0]["calls"][:4] == [0, 2, 4, 6]  # every world-th item
    assert parts[0]["read_at_call"] == [7, 11]  # a batch embedded as soon as it is full
    for p in parts:
        assert torch.equal(p["result"][:, 0], torch.arange(11.0) * 2)
        assert torch.equal(p["plus_one"], torch.arange(11.0)[:, None].expand(-1, 3) + 1)


# --- CIRR on its real annotations, with generated stand-in images ------------------------------


def _stand_in_images(split: str, image_root: Path) -> None:
    names = json.loads((CIRR_ROOT / "image_splits" / f"split.rc2.{split}.json").read_text())
    for name, rel in names.items():
        path = image_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def cirr_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cirr_eval")
    torch.manual_seed(0)
    model, tok = tiny_model(root, "blip2")
    model.eval()
    for split in ("val", "test1"):
        _stand_in_images(split, root / "img_raw")
    return root, model, tok


@pytest.fixture(scope="module")
def cirr_val(cirr_setup):
    """The CIRR val protocol run once (4,181 queries), shared by the tests that read it."""
    from eval.protocols import EvalSettings, cirr

    root, model, tok = cirr_setup
    settings = EvalSettings(reduce="max", batch_size=256)
    return cirr(model, tok, CIRR_ROOT, "val", root / "img_raw", settings=settings)


def test_cirr_val_on_the_real_annotations(cirr_val):
    ev = cirr_val
    m = ev.metrics
    assert len(ev.query_ids) == 4181 and len(ev.gallery_ids) == 2297
    assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= m["R@50"] <= 100
    assert m["Rsubset@1"] <= m["Rsubset@2"] <= m["Rsubset@3"] <= 100
    assert 5 < m["Rsubset@1"] < 45  # an untrained model is near chance (1 in 5)
    assert m["Ravg"] == pytest.approx((m["R@5"] + m["Rsubset@1"]) / 2)
    assert all(r not in top for r, top in zip(ev.references, ev.top_ids))  # reference removed


def test_cirr_test_submission_matches_the_official_examples(cirr_setup, tmp_path):
    from data.benchmarks import read_cirr
    from eval.protocols import EvalSettings, cirr

    root, model, tok = cirr_setup
    ev = cirr(
        model,
        tok,
        CIRR_ROOT,
        "test1",
        root / "img_raw",
        tmp_path,
        EvalSettings(reduce="max", batch_size=256),
    )
    recall, subset = (json.loads(p.read_text()) for p in ev.files)
    queries = {q.query_id: q for q in read_cirr(CIRR_ROOT, "test1")[0]}
    for mine, name in ((recall, "recall"), (subset, "recall_subset")):
        example_path = EXAMPLES / f"submission_example_{name}.json"
        if example_path.is_file():  # outside CI the official examples sit beside the repo
            example = json.loads(example_path.read_text())
            assert mine.keys() == example.keys()
            assert {len(v) for k, v in mine.items() if k not in ("version", "metric")} == {
                len(v) for k, v in example.items() if k not in ("version", "metric")
            }
        assert mine["version"] == "rc2" and mine["metric"] == name
        assert len(mine) == len(queries) + 2
    for pairid, top in recall.items():
        if pairid in queries:
            assert len(top) == 50 and queries[pairid].reference not in top
            allowed = set(queries[pairid].subset) - {queries[pairid].reference}
            assert len(subset[pairid]) == 3 and set(subset[pairid]) <= allowed
    assert max(p.stat().st_size for p in ev.files) < 5 * 2**20


def test_missing_images_are_one_error_listing_them(cirr_setup, tmp_path):
    from eval.protocols import cirr

    _, model, tok = cirr_setup
    with pytest.raises(FileNotFoundError, match=r"2297 of 2297 image\(s\) missing"):
        cirr(model, tok, CIRR_ROOT, "val", tmp_path / "nowhere")


def test_explanations_and_report_are_written_and_differ(cirr_setup, cirr_val, tmp_path):
    from eval.explain import explain
    from eval.report import write_report
    from eval.run import explain_queries

    _, model, tok = cirr_setup
    ev = cirr_val
    files = explain_queries(model, tok, ev, [0, 7], tmp_path / "explain", "max")
    maps = [np.load(f) for f in files if f.suffix == ".npz"]
    assert all(f.stat().st_size > 5000 for f in files if f.suffix == ".png")
    assert not np.allclose(maps[0]["patch_attention"], maps[1]["patch_attention"])
    assert not np.allclose(maps[0]["patch_gradcam"], maps[1]["patch_gradcam"])
    assert maps[0]["patch_attention"].sum() == pytest.approx(1.0, abs=1e-4)
    assert list(maps[0]["words"])[0] == "[CLS]"
    # BLIP too: its cross-attention comes from the edit's tokens
    blip, btok = tiny_model(tmp_path / "blip", "blip")
    e = explain(blip, btok, torch.randn(3, 32, 32), "make it red", _unit(1, 16)[0:1])
    assert e.patch_attention.shape == (4, 4) and len(e.word_attention) == len(e.words) == 5
    report = write_report(ev, tmp_path / "report", n=3, k=4, combiner_weights=np.random.rand(20, 3))
    names = {p.name for p in report}
    assert {"retrievals.png", "index.html", "recall.png", "combiner_weights.png"} <= names
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<img") == 3 * (1 + 4 + 1)  # query, top-4, ground truth
    # an edit is text from the annotations: escaped, never markup
    from dataclasses import replace

    hostile = replace(ev, edits=['<script>alert("x")</script> & more'] * len(ev.edits))
    write_report(hostile, tmp_path / "hostile", n=3, k=4)
    page = (tmp_path / "hostile" / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    # a target the gallery lacks listed first (as TF-CoVR's files do): the one shown is in it
    present = ev.positives[0][0]
    listed = [["not-in-gallery", present]] + [["not-in-gallery"]] * (len(ev.positives) - 1)
    partial = replace(ev, positives=listed)
    assert partial.shown_target(0) == present and partial.shown_target(1) is None
    write_report(partial, tmp_path / "partial", k=4, chosen=ev.query_ids[:2])
    page = (tmp_path / "partial" / "index.html").read_text()
    assert page.count("ground truth") == 1 and f"ground truth<br>{present}" in page
    (png,) = explain_queries(model, tok, partial, [1], tmp_path / "px", "max")[:1]
    assert png.exists()  # explained against its top-1, the only gallery item it can name


# --- WebVid-CoVR reports: every row's pictures come from its own record ----------------------


def _own_pictures(shard_dir) -> dict:
    """(reference, edit, target) -> (first query frame, middle target frame), decoded from the
    query's own record."""
    from sharding import format as fmt
    from sharding.manifest import read_manifest
    from sharding.reader import iter_records, shard_urls

    own = {}
    for record in iter_records(shard_urls(shard_dir, read_manifest(shard_dir))[0]):
        meta = fmt.record_meta(record)
        targets = fmt.target_jpegs(record)
        for j, trip in enumerate(meta["triplets"]):
            key = (trip["pth1"], trip["edit"], meta["target"])
            assert key not in own
            own[key] = (
                fmt.decode_rgb(fmt.query_jpegs(record, j)[0]),
                fmt.decode_rgb(targets[len(targets) // 2]),
            )
    return own


def _webvid_report(rank, world, shard_dir, out):
    import torch.distributed as dist

    from eval.protocols import EvalSettings, webvid_covr
    from eval.report import write_report

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, tok = tiny_model(Path(out) / f"tok{rank}")
    ev = webvid_covr(model, tok, shard_dir, EvalSettings(rank=rank, world=world))
    if rank == 0:
        own = _own_pictures(shard_dir)
        for i in range(len(ev.query_ids)):  # the loaders the report draws with, every row
            query, target = own[ev.references[i], ev.edits[i], ev.positives[i][0]]
            assert np.array_equal(ev.images.query(i), query), f"row {i}: another query's frame"
            assert np.array_equal(ev.images.gallery(ev.positives[i][0]), target), f"row {i}"
        write_report(ev, Path(out) / "report", n=6, k=3)
        rows = {"edits": ev.edits, "references": ev.references, "positives": ev.positives}
        (Path(out) / "rows.json").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def test_webvid_report_rows_show_their_own_query_and_target_under_1_and_2_ranks(
    small_corpus, tmp_path
):
    from configs.schema import ShardConfig
    from sharding.pack import pack

    root, _ = small_corpus
    shards = tmp_path / "shards"  # 3 records per shard: rank r holds records r, r + 2, ...
    pack(
        root / "val.csv",
        root / "videos",
        shards,
        ShardConfig(samples_per_shard=3, target_frames=3, workers=1),
    )
    own = _own_pictures(shards)
    _webvid_report(0, 1, shards, tmp_path / "one")
    run_ranks(_webvid_report, 2, (shards, tmp_path / "two"))
    rows = [json.loads((tmp_path / run / "rows.json").read_text()) for run in ("one", "two")]
    assert rows[0] == rows[1] and len(rows[0]["edits"]) >= 6  # the same rows whatever the ranks
    for run in ("one", "two"):
        report = tmp_path / run / "report"
        page_rows = (report / "index.html").read_text().split("<tr>")[1:]
        assert len(page_rows) == 6
        for page_row in page_rows:  # query thumbnail first, ground truth last
            thumbs = re.findall(r'src="(images/[^"]+)"', page_row)
            i = int(re.fullmatch(r"images/query(\d+)\.png", thumbs[0]).group(1))
            reference, edit, target = (
                rows[0]["references"][i],
                rows[0]["edits"][i],
                rows[0]["positives"][i][0],
            )
            assert html.escape(edit) in page_row
            query, target_frame = own[reference, edit, target]
            assert np.array_equal(np.asarray(Image.open(report / thumbs[0])), query)
            assert np.array_equal(np.asarray(Image.open(report / thumbs[-1])), target_frame)


# --- launch/eval.py end to end on packed shards -------------------------------------------------


def test_launch_eval_webvid_covr_logs_to_mlflow(small_corpus, tmp_path):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from configs.schema import ShardConfig
    from sharding.pack import pack
    from train.export import export_model

    root, _ = small_corpus
    pack(
        root / "test.csv",
        root / "videos",
        tmp_path / "shards",
        ShardConfig(samples_per_shard=4, target_frames=3, workers=1),
    )
    model, tok = tiny_model(tmp_path / "tok", "blip2", combiner="mlp")
    export_model(model.state_dict(), model.cfg, tok, tmp_path / "export")
    out = tmp_path / "eval"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [
        sys.executable,
        "launch/eval.py",
        "--protocol",
        "webvid-covr",
        "--checkpoint",
        str(tmp_path / "export"),
        "--data",
        str(tmp_path / "shards"),
        "--out",
        str(out),
        "--report",
        "3",
        "--explain",
        "2",
        "--tracking-uri",
        uri,
        "--index",
        "hnsw",
    ]
    done = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert set(result["metrics"]) >= {
        "R@1",
        "R@5",
        "R@10",
        "R@50",
        "meanR3",
        "meanR4",
        "search_hnsw_top10_agreement",
    }
    assert result["conventions"]["search"] == "approximate (hnsw)"  # with its agreement above
    assert result["conventions"]["queries"].startswith("one triplet per target")
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.metrics["webvid-covr/val/recall_at_1"] == pytest.approx(
        result["metrics"]["R@1"]
    )
    assert run.data.tags["covr.checkpoint"].endswith("export")
    artifacts = {
        a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "eval/webvid-covr/report")
    }
    assert "eval/webvid-covr/report/combiner_weights.png" in artifacts
    assert "eval/webvid-covr/report/images" in artifacts  # the html page's thumbnails
    bad = subprocess.run(
        cmd[:5] + [str(tmp_path / "nothing")] + cmd[6:],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no exported CoVR model" in bad.stderr


# --- FashionIQ and CIRCO on small roots in their published layouts ------------------------------


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
        path
    )


def test_fashioniq_per_category_and_average(cirr_setup, tmp_path):
    from eval.protocols import fashioniq

    _, model, tok = cirr_setup
    for c, cat in enumerate(("dress", "shirt")):
        names = [f"{cat}{i}" for i in range(14)]
        for i, n in enumerate(names):
            _image(tmp_path / "images" / f"{n}.png", 100 * c + i)
        caps = [
            {"candidate": names[i], "target": names[i + 1], "captions": ["is red.", "has dots"]}
            for i in range(6)
        ]
        (tmp_path / "captions").mkdir(exist_ok=True)
        (tmp_path / "image_splits").mkdir(exist_ok=True)
        (tmp_path / "captions" / f"cap.{cat}.val.json").write_text(json.dumps(caps))
        (tmp_path / "image_splits" / f"split.{cat}.val.json").write_text(json.dumps(names))
    ev = fashioniq(model, tok, tmp_path, ("dress", "shirt"))
    m = ev.metrics
    assert set(m) == {
        "dress/R@10",
        "dress/R@50",
        "shirt/R@10",
        "shirt/R@50",
        "average/R@10",
        "average/R@50",
    }
    assert m["dress/R@50"] == 100.0  # a 14-image gallery: every target is within 50
    assert m["average/R@10"] == pytest.approx((m["dress/R@10"] + m["shirt/R@10"]) / 2)
    assert ev.edits[0] == "is red and has dots" and len(ev.query_ids) == 12
    assert ev.images.query(7).shape == (20, 20, 3)


def test_fashioniq_removes_the_candidate_as_covr_or_keeps_it_as_clip4cir(cirr_setup, tmp_path):
    from eval.protocols import EvalSettings, fashioniq

    _, model, tok = cirr_setup
    names = [f"dress{i}" for i in range(12)]
    for i, n in enumerate(names):
        _image(tmp_path / "images" / f"{n}.png", 7 * i)
    caps = [
        {"candidate": names[i], "target": names[i + 2], "captions": ["is red", "longer"]}
        for i in range(8)
    ]
    for sub, name, body in (
        ("captions", "cap.dress.val.json", caps),
        ("image_splits", "split.dress.val.json", names),
    ):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / name).write_text(json.dumps(body))
    covr = fashioniq(model, tok, tmp_path, ("dress",))
    kept = fashioniq(
        model, tok, tmp_path, ("dress",), settings=EvalSettings(fashioniq_gallery="clip4cir")
    )
    assert covr.conventions["gallery"].startswith("candidate removed")
    assert kept.conventions["gallery"].startswith("candidate kept")
    for i, cap in enumerate(caps):  # the same ranking, less the candidate
        assert cap["candidate"] not in covr.top_ids[i] and cap["candidate"] in kept.top_ids[i]
        assert covr.top_ids[i] == [g for g in kept.top_ids[i] if g != cap["candidate"]]
    with pytest.raises(ValueError, match="fashioniq_gallery"):
        fashioniq(model, tok, tmp_path, ("dress",), settings=EvalSettings(fashioniq_gallery="x"))


def test_circo_map_and_test_submission(cirr_setup, tmp_path):
    from eval.protocols import circo

    _, model, tok = cirr_setup
    images = tmp_path / "COCO2017_unlabeled" / "unlabeled2017"
    ids = list(range(1, 61))
    for i in ids:
        _image(images / f"{i:012d}.jpg", i)
    (tmp_path / "annotations").mkdir()
    # every other image is correct: AP@K = 1 for every K, so mAP = 100 through the whole pipeline
    val = [
        {
            "id": q,
            "reference_img_id": q + 1,
            "target_img_id": q + 2,
            "relative_caption": "make it red",
            "shared_concept": "a thing",
            "gt_img_ids": [i for i in ids if i != q + 1],
        }
        for q in range(3)
    ]
    (tmp_path / "annotations" / "val.json").write_text(json.dumps(val))
    ev = circo(model, tok, tmp_path)
    assert {k: v for k, v in ev.metrics.items() if k.startswith("mAP")} == pytest.approx(
        {"mAP@5": 100.0, "mAP@10": 100.0, "mAP@25": 100.0, "mAP@50": 100.0}
    )
    assert {f"R@{k}" for k in (5, 10, 25, 50)} <= set(ev.metrics)  # of target_img_id
    test = [
        {
            "id": q,
            "reference_img_id": q + 1,
            "relative_caption": "make it blue",
            "shared_concept": "x",
        }
        for q in range(4)
    ]
    (tmp_path / "annotations" / "test.json").write_text(json.dumps(test))
    ev = circo(model, tok, tmp_path, "test", out_dir=tmp_path / "sub")
    submission = json.loads(ev.files[0].read_text())
    assert set(submission) == {"0", "1", "2", "3"}
    assert all(
        len(v) == 50 and isinstance(v[0], int) and int(q) + 1 not in v
        for q, v in submission.items()
    )
