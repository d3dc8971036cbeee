"""Evaluation as the reference does it, each rule against hand-computed cases: all-pairs `max`,
exact search over the whole gallery, FashionIQ's gallery, WebVid-CoVR's test rules."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def test_webvid_targets_are_renormalised_before_scoring():
    from eval.retrieval import webvid_topk

    # pooled (not re-normalised) target tokens; query token (1, 0)
    a = torch.tensor([[0.6, 0.0], [0.0, 0.6]])  # mean . q = .3; re-normalised: .5
    b = torch.tensor([[0.4, 0.9165], [0.4, -0.9165]])  # unit tokens: .4 either way
    emb = {
        "query": torch.tensor([[[1.0, 0.0]]]),
        "gallery": torch.stack([a, b]),
        "gallery_ids": ["a", "b"],
        "query_refs": ["x"],
    }
    scores, ids = webvid_topk(emb, 2)
    assert ids[0].tolist() == [0, 1] and scores[0] == pytest.approx([0.5, 0.4], abs=1e-4)
    emb["query_refs"] = ["a"]  # the query's own video is never an answer
    assert webvid_topk(emb, 2)[1][0].tolist() == [1]


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
            return model(Task.ENCODE_QUERY, frames, text.input_ids, text.attention_mask)[0]

        assert torch.allclose(ev.query_emb[n], query(64, "longest"), atol=1e-5)
        assert not torch.allclose(ev.query_emb[n], query(3, "max_length"), atol=1e-3)
    assert torch.allclose(
        ev.gallery_emb.norm(dim=-1), torch.ones(ev.gallery_emb.shape[:2]), atol=1e-5
    )
    assert ev.conventions["targets"] == "pooled tokens re-normalised"
    assert json.dumps(ev.conventions)  # goes into results.json
