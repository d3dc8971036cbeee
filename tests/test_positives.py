"""`loss.positives=all`: a query's valid targets (the triplets sharing its video and edit) go
from the annotations through the shards and the batch into HN-NCE as positives, in the batch
and in the queue; with one valid target each it is today's loss."""

from functools import partial

import pytest
import torch

from configs.schema import LossConfig, SamplerConfig, ShardConfig
from data.webvid_covr import Triplet, write_annotations
from eval.similarity import similarity
from sharding.batch import MAX_POSITIVES, collate, target_positives
from sharding.records import build_records
from train.losses import hn_nce_from_similarity
from train.objective import contrast_ids, covr_contrast, valid_targets
from train.queue import TargetQueue


def _t(pth1, pth2, edit):
    return Triplet(pth1, pth2, "a dog", "a cat", edit, [0.5, 0.5], 0.9)


def test_records_name_every_valid_target_of_a_query_with_several():
    rows = [_t("q", "a", "make it a cat"), _t("q", "b", "make it a cat"), _t("q", "c", "other")]
    records = build_records(rows, "target")
    ids = {r["target"]: r["target_id"] for r in records}
    trips = {(r["target"], t["edit"]): t for r in records for t in r["triplets"]}
    assert trips[("a", "make it a cat")]["targets"] == sorted([ids["a"], ids["b"]])
    assert trips[("b", "make it a cat")]["targets"] == sorted([ids["a"], ids["b"]])
    assert "targets" not in trips[("c", "other")]  # one valid target: the record is unchanged


def test_the_batch_carries_each_rows_valid_targets_own_first():
    samples = [{"target_id": 7, "targets": [3, 7, 9]}, {"target_id": 2}]
    got = target_positives(samples)
    assert got.shape == (2, MAX_POSITIVES)
    assert got[0, :3].tolist() == [7, 3, 9] and (got[0, 3:] == -1).all()
    assert got[1, 0] == 2 and (got[1, 1:] == -1).all()
    many = target_positives([{"target_id": 0, "targets": list(range(40))}])
    assert many[0].tolist() == list(range(MAX_POSITIVES))  # capped: the rest stay negatives


def test_valid_targets_compares_columns_without_a_cube():
    valid = torch.tensor([[1, 5, -1], [2, -1, -1]])
    assert valid_targets(valid, torch.tensor([5, 2, 1, -1])).tolist() == [
        [True, False, True, False],
        [False, True, False, False],
    ]


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_contrast_with_valid_targets_in_the_batch_and_the_queue():
    cfg = LossConfig(positives="all")
    emb = {"query": _unit(4, 1, 8, seed=0), "target": _unit(4, 1, 8, seed=1)}
    ids = torch.arange(4)
    single = torch.full((4, MAX_POSITIVES), -1)
    single[:, 0] = ids
    for queue in (None, TargetQueue(4, (1, 8))):  # also with each row's own target queued
        if queue is not None:
            queue.enqueue(emb["target"], ids)
        copy = None if queue is None else TargetQueue(4, (1, 8))
        if copy is not None:
            copy.load_state_dict(queue.state_dict())
        assert torch.equal(
            covr_contrast(emb, single, cfg, "mean", queue)[0],
            covr_contrast(emb, ids, cfg, "mean", copy)[0],
        )

    valid = single.clone()
    valid[0, 1], valid[1, 1] = 1, 0  # rows 0 and 1: each other's target is valid
    valid[2, 1] = 42  # row 2: a target that is only in the queue
    queue = TargetQueue(3, (1, 8))
    queued = _unit(3, 1, 8, seed=2)
    queue.enqueue(queued, torch.tensor([42, 43, 3]))
    got, _ = covr_contrast(emb, valid, cfg, "mean", queue)
    sim = similarity(emb["query"], emb["target"], "mean")
    extra = similarity(emb["query"], queued, "mean")
    pos = torch.eye(4, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    extra_pos = torch.zeros(4, 3, dtype=torch.bool)
    extra_pos[2, 0] = True
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[3, 2] = False  # the queued copy of row 3's own target
    want = hn_nce_from_similarity(
        sim, cfg.temperature, cfg.alpha, cfg.beta, extra, mask, "corrected", pos, extra_pos
    )
    assert torch.allclose(got, want)
    assert not torch.allclose(got, covr_contrast(emb, ids, LossConfig(), "mean")[0])
    batch = {"target_ids": ids, "target_positives": valid}
    assert contrast_ids(batch, cfg) is valid and contrast_ids(batch, LossConfig()) is ids


def test_valid_targets_travel_through_packed_shards_into_batches(small_corpus, tmp_path):
    from sharding.pack import pack
    from sharding.reader import ShardReader, open_shards
    from tests.tiny import tiny_model

    root, _ = small_corpus
    from data.webvid_covr import read_annotations

    rows = read_annotations(root / "train.csv")[:6]
    # the first query again, with the second row's target and the same edit: two valid targets
    rows.append(
        Triplet(
            rows[0].pth1,
            rows[1].pth2,
            rows[0].txt1,
            rows[1].txt2,
            rows[0].edit,
            rows[1].scores,
            0.5,
        )
    )
    csv = tmp_path / "train.csv"
    write_annotations(csv, rows)
    pack(
        csv,
        root / "videos",
        tmp_path / "shards",
        ShardConfig(samples_per_shard=4, target_frames=2, workers=1, epoch="triplet"),
    )
    tok = tiny_model(tmp_path / "tok")[1]
    shards = open_shards(tmp_path / "shards")
    reader = ShardReader(
        shards.urls,
        shards.counts,
        batch_size=len(rows),
        collate=partial(collate, tokenizer=tok, image_size=32, max_text_len=8),
        sampler=SamplerConfig("random", buffer=64),
    )
    reader.set_position(0, 0, 1)
    batch, info = next(iter(reader))
    valid = batch["target_positives"]
    keyed = {tuple(sorted(t for t in row.tolist() if t >= 0)) for row in valid}
    pair = {int(valid[i, 0]) for i in range(len(rows)) if (valid[i] >= 0).sum() == 2}
    assert len(pair) == 2 and tuple(sorted(pair)) in keyed  # both rows name both targets


@pytest.mark.parametrize("positives", ["one", "all"])
def test_the_loss_with_either_rule_has_finite_gradients(positives, tmp_path, small_corpus):
    """The tiny model's loss and gradients with each rule: finite, and gradients reach it."""
    from tests.tiny import tiny_model
    from train.objective import covr_loss

    model, tok = tiny_model(tmp_path)
    samples = [
        {
            "query_frames": torch.randint(0, 255, (1, 32, 32, 3), dtype=torch.uint8).numpy(),
            "target_frames": torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8).numpy(),
            "edit": "make it red",
            "scores": [0.5, 0.5],
            "target_id": i % 3,
            "targets": [0, 1] if i % 3 < 2 else [],
            "group": i,
        }
        for i in range(4)
    ]
    batch = collate(samples, tok, 32, 8)
    loss, _ = covr_loss(model, batch, LossConfig(positives=positives))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
