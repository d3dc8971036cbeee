"""Engine benchmarks, side by side in one run:

1. per-step time of the DeepSpeed engine (1 rank, ZeRO-0) against a plain PyTorch loop on the same
   model and batches (goal: overhead at most 10%);
2. per-rank parameter + gradient + optimizer-state memory at ZeRO-0 against ZeRO-3 with 2 ranks
   (goal: stage 3 at most 0.55x of stage 0), counted from the tensors each rank holds at the peak
   (after a backward pass, with the Adam moments allocated).

    python bench/engine_bench.py [--steps 30]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.train_bench import SIZES, model_and_batch  # noqa: E402
from configs.schema import LossConfig  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402
from train.engine import build_engine  # noqa: E402
from train.objective import covr_loss  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 32,
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
    "gradient_clipping": 0.0,  # as the plain loop (DeepSpeed's default would clip at 1.0)
}


def plain_steps(model, batch, steps):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = covr_loss(model, batch, LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def engine_steps(engine, batch, steps):
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = covr_loss(engine, batch, LossConfig())
        engine.backward(loss)
        engine.step()
    return (time.perf_counter() - start) / steps


def overhead(steps: int, size: str) -> None:
    from train.engine import init_distributed

    init_distributed(60)
    with tempfile.TemporaryDirectory() as tmp:
        plain_model, batch = model_and_batch(tmp, size)
        ds_model, _ = model_and_batch(tmp, size)
    params = ds_model.trainable_parameters()
    engine, *_ = build_engine(
        ds_model,
        params,
        torch.optim.AdamW(params, lr=1e-4),
        None,
        {**DS_CONFIG, "zero_optimization": {"stage": 0}},
    )
    plain_steps(plain_model, batch, 3), engine_steps(engine, batch, 3)  # warm-up
    plain, ds, ds_reduce = [], [], []
    for round_ in range(4):  # interleaved rounds, best of each; who goes first alternates, since
        if round_ % 2 == 0:  # whichever runs first in a round measured up to 20% slower here
            plain.append(plain_steps(plain_model, batch, steps))
        ds.append(engine_steps(engine, batch, steps))
        engine.enable_backward_allreduce = True  # DeepSpeed as shipped: the single-rank all-reduce
        ds_reduce.append(engine_steps(engine, batch, steps))
        engine.enable_backward_allreduce = False
        if round_ % 2 == 1:
            plain.append(plain_steps(plain_model, batch, steps))
    p, d, r = min(plain), min(ds), min(ds_reduce)
    print(
        f"step time: plain PyTorch {p * 1e3:.1f} ms, project engine (DeepSpeed ZeRO-0) {d * 1e3:.1f} ms, "
        f"overhead {100 * (d / p - 1):+.1f}%; with DeepSpeed's single-rank all-reduce {r * 1e3:.1f} ms, "
        f"{100 * (r / p - 1):+.1f}%"
    )


# where DeepSpeed's optimizers keep master weights and gradients (names differ by stage/precision)
OPTIMIZER_TENSORS = (
    "fp32_groups",
    "fp32_groups_flat",
    "fp32_partitioned_groups_flat",
    "single_partition_of_fp32_groups",
    "fp32_groups_flat_partition",
    "fp32_groups_gradients_flat",
    "grad_partitions_flat_buffer",
    "averaged_gradients",
)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
        yield obj.grad
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _memory(rank, world, stage, precision, out):
    """Model states a rank holds at their peak: after the backward pass of the second step, when
    gradients and the optimizer's moments exist together (the ZeRO paper's accounting)."""
    from train.engine import init_distributed

    init_distributed(60)
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = model_and_batch(tmp, "base")
    params = model.trainable_parameters()
    engine, opt, _ = build_engine(
        model,
        params,
        torch.optim.AdamW(params, lr=1e-4),
        None,
        {
            **DS_CONFIG,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": precision == "bf16"},
        },
    )
    for step in range(2):
        loss, _ = covr_loss(engine, batch, LossConfig())
        engine.backward(loss)
        if step == 0:
            engine.step()
    seen, total = set(), 0
    holders = [getattr(p, "ds_tensor", p) if stage == 3 else p for p in model.parameters()]
    holders += [getattr(opt, name, None) for name in OPTIMIZER_TENSORS]
    holders += [state for state in getattr(opt, "optimizer", opt).state.values()]
    for t in _tensors(holders):
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    torch.save(total, f"{out}/mem{stage}{precision}_{rank}.pt")


def memory(precision: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        result = {}
        for stage in (0, 3):
            run_ranks(_memory, 2, (stage, precision, out))
            result[stage] = max(torch.load(f"{out}/mem{stage}{precision}_{r}.pt") for r in range(2))
    print(
        f"[{precision}] per-rank params+grads+optimizer state, 2 ranks: ZeRO-0 {result[0] / 2**20:.2f} MiB, "
        f"ZeRO-3 {result[3] / 2**20:.2f} MiB, ratio {result[3] / result[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", default="base", choices=sorted(SIZES))
    args = parser.parse_args()
    for precision in ("fp32", "bf16"):
        memory(precision)
    overhead(args.steps, args.size)


if __name__ == "__main__":
    main()
