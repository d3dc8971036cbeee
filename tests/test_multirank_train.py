"""Two real ranks (gloo): global negatives, queue fill, momentum update under ZeRO-3."""

import pytest
import torch
import torch.distributed as dist

from sharding.batch import Task
from tests.multirank import run_ranks

pytestmark = pytest.mark.e2e


def _zero3_engine(model, micro_batch: int):
    """`model` under ZeRO-3 (parameters partitioned across the ranks), plain SGD."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]


def _gather_and_queue(rank, world, out_dir):
    import torch.nn.functional as F

    from train.distributed import gather, gather_with_grad
    from train.losses import hn_nce
    from train.queue import TargetQueue

    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(0)
    q_all = F.normalize(torch.randn(2 * world, 8, generator=g), dim=-1)
    t_all = F.normalize(torch.randn(2 * world, 8, generator=g), dim=-1)
    mine = slice(2 * rank, 2 * rank + 2)
    q = q_all[mine].clone().requires_grad_()
    loss = hn_nce(gather_with_grad(q), gather(t_all[mine]))
    loss.backward()
    # single-process reference: the same global loss; this rank's rows carry world x their
    # gradient (what the reference's summed gather gives), so the averaged update is exact
    q_ref = q_all.clone().requires_grad_()
    hn_nce(q_ref, t_all).backward()
    assert torch.allclose(loss.detach(), hn_nce(q_all, t_all), atol=1e-6)
    assert torch.allclose(q.grad, world * q_ref.grad[mine], atol=1e-6)

    queue = TargetQueue(16, (8,))
    for step in range(3):
        ids = torch.tensor([100 * step + 10 * rank, 100 * step + 10 * rank + 1])
        queue.enqueue(gather(t_all[mine] + step), gather(ids))
    torch.save(queue.state_dict(), f"{out_dir}/queue{rank}.pt")
    dist.destroy_process_group()


def test_global_negatives_and_cross_rank_queue(tmp_path):
    run_ranks(_gather_and_queue, 2, (str(tmp_path),))
    q0, q1 = (torch.load(tmp_path / f"queue{r}.pt") for r in (0, 1))
    assert torch.equal(q0["features"], q1["features"]) and torch.equal(q0["ids"], q1["ids"])
    assert q0["ids"][:12].tolist() == [0, 1, 10, 11, 100, 101, 110, 111, 200, 201, 210, 211]


def _update_of_ranks(rank, world, stage, out_dir):
    import deepspeed
    import torch.nn.functional as F

    from train.distributed import gather, gather_with_grad
    from train.engine import init_distributed
    from train.losses import hn_nce

    init_distributed(60)
    g = torch.Generator().manual_seed(0)
    x_all, t_all = torch.randn(4 * world, 6, generator=g), torch.randn(4 * world, 5, generator=g)
    t_all = F.normalize(t_all, dim=-1)
    torch.manual_seed(1)
    layer = torch.nn.Linear(6, 5)
    start = {n: p.detach().clone() for n, p in layer.named_parameters()}
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 when unset
    }
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    engine = deepspeed.initialize(model=layer, optimizer=optimizer, config=config)[0]
    mine = slice(4 * rank, 4 * rank + 4)
    query = F.normalize(engine(x_all[mine]), dim=-1)
    loss = hn_nce(gather_with_grad(query), gather(t_all[mine]))
    engine.backward(loss)
    engine.step()
    if rank == 0:
        after = {n: p.detach().clone() for n, p in layer.named_parameters()}
        torch.save({"start": start, "after": after, "x": x_all, "t": t_all}, f"{out_dir}/upd.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [0, 2])
def test_ranks_give_the_update_of_one_process_on_the_global_batch(tmp_path, stage):
    """The gathered loss's gradient on N ranks, averaged by the engine, is the gradient one
    process computes on the whole batch (plain SGD: the update shows the gradient's scale)."""
    import torch.nn.functional as F

    run_ranks(_update_of_ranks, 2, (stage, str(tmp_path)))
    saved = torch.load(tmp_path / "upd.pt")
    layer = torch.nn.Linear(6, 5)
    layer.load_state_dict(saved["start"])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    from train.losses import hn_nce

    hn_nce(F.normalize(layer(saved["x"]), dim=-1), saved["t"]).backward()
    optimizer.step()
    for name, p in layer.named_parameters():
        moved = (saved["after"][name] - saved["start"][name]).abs().max()
        assert moved > 1e-3, name  # the step did something
        assert torch.allclose(p.detach(), saved["after"][name], atol=1e-6), name


def _momentum_zero3(rank, world, out_dir):
    import deepspeed

    from tests.tiny import tiny_model
    from train.engine import init_distributed
    from train.queue import MomentumEncoder

    init_distributed(60)
    torch.manual_seed(0)
    model, _ = tiny_model(__import__("pathlib").Path(out_dir) / f"r{rank}", "blip2")
    model.eval()
    ema = MomentumEncoder(model, momentum=0.5)
    before = {n: t.clone() for n, t in ema.params.items()}
    engine = _zero3_engine(model, micro_batch=1)
    assert any(hasattr(p, "ds_id") for p in model.parameters())
    with torch.no_grad():  # change the partitioned weights: +1 everywhere
        with deepspeed.zero.GatheredParameters(model.trainable_parameters(), modifier_rank=0):
            if rank == 0:
                for p in model.trainable_parameters():
                    p.add_(1.0)
    ema.update()
    for name, value in ema.params.items():
        assert torch.allclose(value, before[name] + 0.5, atol=1e-6), name
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = ema.encode_target_frames(x)
    torch.save(out, f"{out_dir}/ema{rank}.pt")
    del engine
    dist.destroy_process_group()


def test_momentum_update_under_zero3(tmp_path):
    run_ranks(_momentum_zero3, 2, (str(tmp_path),))
    a, b = torch.load(tmp_path / "ema0.pt"), torch.load(tmp_path / "ema1.pt")
    assert a.shape == (2, 4, 16) and torch.allclose(a, b, atol=1e-6)


def _frozen_targets_zero3(rank, world, out_dir):
    """ZeRO-3 partitions the frozen starting copy too: targets must still come out whole and
    equal on every rank, and a training step must leave them unchanged."""

    from configs.schema import LossConfig
    from tests.test_models import _batch
    from tests.tiny import tiny_model
    from train.engine import init_distributed
    from train.objective import covr_loss

    init_distributed(60)
    torch.manual_seed(0)
    model, tok = tiny_model(__import__("pathlib").Path(out_dir) / f"r{rank}", "blip2")
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = model(Task.ENCODE_TARGET_FRAMES, x)
    engine = _zero3_engine(model, micro_batch=4)
    engine.eval()
    assert torch.allclose(engine(Task.ENCODE_TARGET_FRAMES, x), plain, atol=1e-6)
    loss, _ = covr_loss(engine, _batch(tok, seed=rank), LossConfig(caption_weight=0.5))
    engine.backward(loss)
    engine.step()
    assert torch.allclose(engine(Task.ENCODE_TARGET_FRAMES, x), plain, atol=1e-6)
    torch.save(plain, f"{out_dir}/frozen{rank}.pt")
    del engine
    dist.destroy_process_group()


def test_frozen_starting_targets_under_zero3(tmp_path):
    run_ranks(_frozen_targets_zero3, 2, (str(tmp_path),))
    assert torch.allclose(torch.load(tmp_path / "frozen0.pt"), torch.load(tmp_path / "frozen1.pt"))
