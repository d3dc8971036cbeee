"""Evaluation as the reference does it, each rule against hand-computed cases: all-pairs `max`,
exact search over the whole gallery, FashionIQ's gallery, WebVid-CoVR's test rules, CIRR's
folder gallery and soft Recall_subset, CIRCO's R@K of target_img_id."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.search import IndexSpec, exact_topk, retrieve
from eval.similarity import similarity
from sharding.batch import Task


def test_max_is_the_best_of_every_query_token_target_token_pair():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two query tokens
    t = torch.tensor([[[0.6, 0.8], [0.0, -1.0]]])  # two target tokens
    # pairs: q0.t0 = .6, q0.t1 = 0, q1.t0 = .8, q1.t1 = -1 -> .8 (averaging the query first: .7)
    assert similarity(q, t, "max").item() == pytest.approx(0.8)
    assert similarity(q, t, "mean").item() == pytest.approx(
        0.5 * 0.3 + 0.5 * -0.1
    )  # means (.5, .5), (.3, -.1)


def _planted(n=300, d=8):
    """Queries whose true best item has a poor token mean: every other item is orthogonal to the
    queries (score 0), the planted one has one token equal to a query token (score 1) and the
    rest pointing away (mean far below 0)."""
    g = torch.Generator().manual_seed(0)
    others = torch.zeros(n, 4, d)
    others[:, :, 2:] = F.normalize(torch.randn(n, 4, d - 2, generator=g), dim=-1)
    planted = torch.zeros(4, d)
    planted[0, 0] = 1.0
    planted[1:, 0], planted[1:, 1] = -0.8, -0.6
    gallery = torch.cat([others, planted[None]])
    query = torch.zeros(2, 2, d)
    query[:, 0, 0], query[:, 1, 1] = 1.0, 1.0
    return query, gallery


def test_max_retrieval_is_exact_over_the_whole_gallery():
    query, gallery = _planted()
    planted = len(gallery) - 1
    scores, ids = retrieve(query, gallery, 5, "max")
    assert ids[:, 0].tolist() == [planted, planted] and scores[:, 0] == pytest.approx([1.0, 1.0])
    # the approximate mode shortlists by token means and misses it (hence: not the default)
    _, approx = retrieve(query, gallery, 5, "max", spec=IndexSpec("hnsw"), candidates=50)
    assert planted not in approx
    # random 8-token data: the chunked search equals the full matrix, with exclusions
    q = F.normalize(torch.randn(37, 8, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    g = F.normalize(torch.randn(290, 8, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    exclude = [[i % 290, (i * 7) % 290] for i in range(37)]
    full = similarity(q, g, "max")
    for i, banned in enumerate(exclude):
        full[i, banned] = float("-inf")
    top = full.topk(20)
    s, i = exact_topk(q, g, 20, "max", exclude, pairs=5000)  # many small chunks
    assert np.array_equal(i, top.indices.numpy())
    np.testing.assert_allclose(s, top.values.numpy(), atol=1e-6)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_webvid_targets_are_renormalised_before_scoring(reduce):
    from eval.retrieval import compared_rows, webvid_topk

    # target tokens as the model gives them (not unit); query token (1, 0)
    a = torch.tensor([[0.6, 0.0], [0.0, 0.6]])  # mean . q = .3; re-normalised: .5 (max: 1)
    b = torch.tensor([[0.4, 0.9165], [0.4, -0.9165]])  # unit tokens: .4 either way
    query, gallery = compared_rows(torch.tensor([[[1.0, 0.0]]]), torch.stack([a, b]), reduce)
    assert gallery.shape == ((2, 1, 2) if reduce == "mean" else (2, 2, 2))  # means only
    emb = {"query": query, "gallery": gallery, "gallery_ids": ["a", "b"], "query_refs": ["x"]}
    scores, ids = webvid_topk(emb, 2, reduce)
    want = [0.5, 0.4] if reduce == "mean" else [1.0, 0.4]
    assert ids[0].tolist() == [0, 1] and scores[0] == pytest.approx(want, abs=1e-4)
    emb["query_refs"] = ["a"]  # the query's own video is never an answer
    assert webvid_topk(emb, 2, reduce)[1][0].tolist() == [1]


def test_webvid_queries_one_seeded_triplet_per_target_64_tokens_longest(small_corpus, tmp_path):
    from configs.schema import ShardConfig
    from data.text import tokenize
    from data.video import to_model_input
    from eval.protocols import EvalSettings, webvid_covr
    from sharding import format as fmt
    from sharding.manifest import read_manifest
    from sharding.pack import pack
    from sharding.reader import iter_records, shard_urls
    from tests.tiny import tiny_model

    root, _ = small_corpus
    shards = tmp_path / "shards"
    pack(
        root / "train.csv",
        root / "videos",
        shards,
        ShardConfig(samples_per_shard=8, target_frames=3, workers=1),
    )
    records = list(iter_records(shard_urls(shards, read_manifest(shards))[0]))
    assert any(len(fmt.record_meta(r)["triplets"]) > 1 for r in records)
    torch.manual_seed(0)
    model, tok = tiny_model(tmp_path, max_text_len=3)  # training tokens: 3; evaluation: up to 64
    model.eval()
    ev = webvid_covr(model, tok, shards, EvalSettings(seed=5))
    assert len(ev.query_ids) == len(records) == len(ev.gallery_ids)
    for n, record in enumerate(records):
        meta = fmt.record_meta(record)
        j = random.Random(f"5-{record['__key__']}").randrange(len(meta["triplets"]))
        assert ev.edits[n] == meta["triplets"][j]["edit"]
    record, n = records[0], 0
    meta = fmt.record_meta(record)
    j = random.Random(f"5-{record['__key__']}").randrange(len(meta["triplets"]))
    frames = to_model_input(fmt.decode_frames(fmt.query_jpegs(record, j)), 32)[None]
    with torch.no_grad():

        def query(length, padding):
            text = tokenize(tok, [ev.edits[n]], length, padding=padding)
            tokens = model(Task.ENCODE_QUERY, frames, text.input_ids, text.attention_mask)[0]
            return tokens.mean(0, keepdim=True)  # `mean`: only the token mean is kept

        assert torch.allclose(ev.query_emb[n], query(64, "longest"), atol=1e-5)
        assert not torch.allclose(ev.query_emb[n], query(3, "max_length"), atol=1e-3)
    # the mean of unit (re-normalised) tokens: one row per target, never longer than 1
    assert ev.gallery_emb.shape[1] == 1 and (ev.gallery_emb.norm(dim=-1) <= 1 + 1e-5).all()
    assert ev.conventions["targets"] == "pooled tokens re-normalised"
    assert ev.conventions["frames"] == "jpeg q90, targets rgb"  # the shards' packing settings
    from eval.protocols import packed_frames

    assert packed_frames({"config": {"frame_format": "png", "target_channels": "bgr"}}) == (
        "png, targets bgr"
    )
    assert json.dumps(ev.conventions)  # goes into results.json


def _fake_cirr_val(root):
    """Two val queries over a 6-image set in img_raw/dev/, whose folder holds a 7th image the
    split file does not list. Soft labels: query 1 rates every other member .5 (its reference
    1), query 2 rates every other member 1."""
    names = [f"dev-{i}-img0" for i in range(6)]
    (root / "img_raw" / "dev").mkdir(parents=True)
    for i, name in enumerate([*names, "dev-extra"]):
        pixels = np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img_raw" / "dev" / f"{name}.png")
    entries = [
        {
            "pairid": pairid,
            "reference": ref,
            "target_hard": target,
            "target_soft": {**{m: value for m in names if m != ref}, ref: 1.0},
            "caption": "make it red",
            "img_set": {"id": 0, "members": names},
        }
        for pairid, ref, target, value in (
            (1, names[0], names[1], 0.5),
            (2, names[2], names[3], 1.0),
        )
    ]
    for sub, name, body in (
        ("captions", "cap.rc2.val.json", entries),
        ("image_splits", "split.rc2.val.json", {n: f"./dev/{n}.png" for n in names}),
    ):
        (root / sub).mkdir()
        (root / sub / name).write_text(json.dumps(body))


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    from tests.tiny import tiny_model

    torch.manual_seed(0)
    model, tok = tiny_model(tmp_path_factory.mktemp("tiny"), "blip2")
    return model.eval(), tok


def test_cirr_folder_gallery_and_soft_subset_credit(tiny_blip2, tmp_path):
    from eval.protocols import EvalSettings, cirr

    model, tok = tiny_blip2
    _fake_cirr_val(tmp_path)

    def run(**options):
        return cirr(model, tok, tmp_path, settings=EvalSettings(reduce="max", **options))

    ours, folder, soft = run(), run(cirr_gallery="folder"), run(cirr_subset_credit="soft")
    assert len(ours.gallery_ids) == 6 and "dev-extra" not in ours.gallery_ids
    assert len(folder.gallery_ids) == 7 and "dev-extra" in folder.gallery_ids
    # 7 images less the reference: the extra one is in every ranking, and only there
    assert all("dev-extra" in top and len(top) == 6 for top in folder.top_ids)
    assert all("dev-extra" not in top and len(top) == 5 for top in ours.top_ids)
    assert ours.conventions["gallery"].startswith("the split file's images")
    assert folder.conventions["gallery"].startswith("every image in the split's image folder")
    # soft: query 1 earns .5 whatever ranks first (its reference's 1 never counts), query 2 earns
    # 1: Recall_subset@K = 75 for every K, however the untrained model ranks
    assert [soft.metrics[f"Rsubset@{k}"] for k in (1, 2, 3)] == pytest.approx([75.0] * 3)
    assert soft.conventions["subset_credit"].startswith("best target_soft score")
    assert ours.conventions["subset_credit"] == "target_hard only"
    for k in (1, 5, 10, 50):  # R@K counts target_hard either way
        assert soft.metrics[f"R@{k}"] == ours.metrics[f"R@{k}"]
    for key in ("cirr_gallery", "cirr_subset_credit"):
        with pytest.raises(ValueError, match=key):
            run(**{key: "x"})
    assert json.dumps(folder.conventions) and json.dumps(soft.conventions)


def test_eval_job_refuses_an_unknown_choice_naming_its_key():
    from eval.run import EvalJob

    for key in ("fashioniq_gallery", "cirr_gallery", "cirr_subset_credit"):
        with pytest.raises(ValueError, match=f"unknown {key} 'x'"):
            EvalJob("cirr", "ckpt", "data", **{key: "x"})
    job = EvalJob("cirr", "ckpt", "data", cirr_gallery="folder", cirr_subset_credit="soft")
    assert (job.cirr_gallery, job.cirr_subset_credit) == ("folder", "soft")


def test_circo_val_reports_recall_of_target_img_id_beside_map(monkeypatch, tmp_path):
    from eval import coverage, protocols

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(1, 9):
        (images / f"{i:012d}.jpg").write_bytes(b"")
    # (reference, target_img_id, gt_img_ids, the ranking the search returns)
    cases = [
        (1, 2, [2, 3], [2, 4, 3, 5, 6]),  # target 1st
        (2, 3, [3], [4, 5, 3, 6, 7]),  # target 3rd
        (3, 4, [4, 5], [5, 6, 7, 8, 1]),  # target absent; another gt image 1st
    ]
    val = [
        {
            "id": n,
            "reference_img_id": r,
            "target_img_id": t,
            "gt_img_ids": gt,
            "relative_caption": "x",
        }
        for n, (r, t, gt, _) in enumerate(cases)
    ]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "val.json").write_text(json.dumps(val))

    def ranked(model, tok, queries, gallery, s, k, exclude_reference):
        top_ids = [[str(g) for g in c[3]] for c in cases]
        scores = np.tile(np.linspace(0.9, 0.5, 5), (len(cases), 1))
        found = list(gallery), None, None, scores, top_ids
        return queries, gallery, coverage.full(len(queries), len(gallery)), found

    monkeypatch.setattr(protocols, "_search_images", ranked)
    settings = protocols.EvalSettings(ks=(1, 2, 5))
    model = SimpleNamespace(
        cfg=SimpleNamespace(edit_words=30, description="ignore")
    )  # read for the conventions only
    ev = protocols.circo(model, None, tmp_path, image_dir=images, settings=settings)
    assert ev.metrics == pytest.approx(
        {
            "R@1": 100 / 3,
            "R@2": 100 / 3,
            "R@5": 200 / 3,
            # AP@1: 1, 0, 1; AP@2: 1/2, 0, 1/2; AP@5: (1 + 2/3) / 2, (1/3) / 1, 1/2
            "mAP@1": 200 / 3,
            "mAP@2": 100 / 3,
            "mAP@5": 100 * ((1 + 2 / 3) / 2 + 1 / 3 + 1 / 2) / 3,
        }
    )
    assert ev.conventions["metrics"] == "mAP@K of gt_img_ids; R@K of target_img_id (CoVR)"
