import pytest
import torch

from sharding.batch import Task
from tests.tiny import tiny_model
from train.queue import MomentumEncoder, TargetQueue


def test_fifo_order_and_wraparound():
    q = TargetQueue(5, (2,))
    q.enqueue(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2]))
    assert q.ordered()[1].tolist() == [0, 1, 2] and q.filled == 3
    q.enqueue(torch.arange(6.0, 12.0).view(3, 2), torch.tensor([3, 4, 5]))
    feats, ids = q.ordered()
    assert ids.tolist() == [1, 2, 3, 4, 5]  # oldest (0) dropped first
    assert feats[0].tolist() == [2.0, 3.0] and feats[-1].tolist() == [10.0, 11.0]
    q.enqueue(torch.zeros(7, 2), torch.arange(10, 17))  # larger than the queue: newest 5 kept
    assert q.ordered()[1].tolist() == [12, 13, 14, 15, 16]


def test_same_target_ids_are_masked():
    q = TargetQueue(4, (2,))
    q.enqueue(torch.zeros(3, 2), torch.tensor([7, 8, 9]))
    mask = q.negatives_mask(torch.tensor([8, 1]))
    assert mask.tolist() == [[True, False, True], [True, True, True]]


def test_state_round_trip_and_shape_check():
    q = TargetQueue(4, (1, 3))
    q.enqueue(torch.randn(6, 1, 3), torch.arange(6))
    r = TargetQueue(4, (1, 3))
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.features, q.features) and torch.equal(r.ids, q.ids)
    assert (r.ptr, r.filled) == (q.ptr, q.filled)
    with pytest.raises(ValueError, match="queue shape mismatch"):
        TargetQueue(8, (1, 3)).load_state_dict(q.state_dict())


def test_momentum_is_an_ema_of_the_trainable_parameters(tmp_path):
    model, _ = tiny_model(tmp_path, "blip2")
    model.eval()
    ema = MomentumEncoder(model, momentum=0.9)
    assert "hf.query_tokens" in ema.params and not any("vision_model" in n for n in ema.params)
    start = {n: t.clone() for n, t in ema.params.items()}
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(
        ema.encode_target_frames(x), model(Task.ENCODE_TARGET_FRAMES, x), atol=1e-6
    )
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(1.0)
    ema.update()
    assert all(torch.allclose(ema.params[n], start[n] + 0.1, atol=1e-6) for n in start)
    assert not torch.allclose(
        ema.encode_target_frames(x), model(Task.ENCODE_TARGET_FRAMES, x), atol=1e-3
    )
    restored = MomentumEncoder(model, momentum=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.allclose(restored.encode_target_frames(x), ema.encode_target_frames(x))


def test_momentum_copies_a_trainable_vision_tower(tmp_path):
    model, _ = tiny_model(tmp_path, "blip2", freeze_vision=False, train_target_encoder=True)
    ema = MomentumEncoder(model, momentum=0.5)
    assert not ema.share_vision and any("vision_model" in n for n in ema.params)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(1.0)
    ema.update()
    assert all(
        torch.allclose(ema.params[n], dict(model.named_parameters())[n] - 0.5) for n in ema.names
    )


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_training_steps_with_a_full_queue_and_momentum_targets(tmp_path, reduce):
    """The queue is overwritten after the loss is built: backward must not depend on it."""
    from bench.train_bench import make_batch
    from configs.schema import LossConfig
    from train.objective import covr_loss

    torch.manual_seed(0)
    model, tok = tiny_model(tmp_path, reduce=reduce, train_target_encoder=True)
    batch = make_batch(tok, 4, model.cfg.embed_dim, model.cfg.num_query_tokens, frames=2)
    batch.pop("target_embeddings")
    batch["target_frames"] = torch.randn(4, 2, 3, 32, 32)
    tokens = 1 if reduce == "mean" else model.cfg.num_query_tokens
    queue = TargetQueue(8, (tokens, model.cfg.embed_dim))
    momentum = MomentumEncoder(model, 0.9)
    for step in range(3):
        batch["target_ids"] = torch.arange(4) + 4 * step
        loss, _ = covr_loss(model, batch, LossConfig(), queue, momentum)
        loss.backward()
        assert model.hf.query_tokens.grad is not None and torch.isfinite(loss)
    assert queue.filled == 8


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_queue_negatives_enter_the_loss_and_its_false_negatives_do_not():
    from configs.schema import LossConfig
    from eval.similarity import similarity
    from train.losses import hn_nce_from_similarity
    from train.objective import covr_contrast

    cfg = LossConfig()
    emb = {"query": _unit(4, 1, 8, seed=0), "target": _unit(4, 1, 8, seed=1)}
    ids = torch.arange(4)
    alone, _ = covr_contrast(emb, ids, cfg, "mean")

    queue = TargetQueue(6, (1, 8))
    queued = _unit(6, 1, 8, seed=2)
    queue.enqueue(queued, torch.arange(10, 16))
    with_queue, metrics = covr_contrast(emb, ids, cfg, "mean", queue)
    sim = similarity(emb["query"], emb["target"], "mean")
    extra = similarity(emb["query"], queued, "mean")
    expected = hn_nce_from_similarity(sim, cfg.temperature, cfg.alpha, cfg.beta, extra)
    assert torch.allclose(with_queue, expected) and with_queue > alone + 1e-3
    assert metrics["queue_filled"] == 6  # the batch went in after the loss

    own = TargetQueue(4, (1, 8))  # the batch's targets queued under their ids: each query's own
    own.enqueue(emb["target"], ids)  # target is no negative of it, the others' targets are
    own_loss = covr_contrast(emb, ids, cfg, "mean", own)[0]
    not_self = ~torch.eye(4, dtype=torch.bool)
    args = (sim, cfg.temperature, cfg.alpha, cfg.beta, sim)
    assert torch.allclose(own_loss, hn_nce_from_similarity(*args, not_self))
    renamed = TargetQueue(4, (1, 8))  # the same features as other targets: all negatives
    renamed.enqueue(emb["target"], ids + 100)
    assert covr_contrast(emb, ids, cfg, "mean", renamed)[0] > own_loss + 1e-3
