"""Engine benchmarks, side by side in one run:

1. per-step time of the DeepSpeed engine (1 rank, ZeRO-0) against a plain PyTorch loop on the same
   model and batches (goal: overhead at most 10%);
2. per-rank parameter + gradient + optimizer-state memory at ZeRO-0 against ZeRO-3 with 2 ranks
   (goal: stage 3 at most 0.55x of stage 0), counted from the tensors each rank holds.

    python bench/engine_bench.py [--steps 30]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.train_bench import SIZES, model_and_batch  # noqa: E402
from configs.schema import LossConfig  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402
from train.objective import covr_loss  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 32,
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
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
    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(__import__("train.engine", fromlist=["free_port"]).free_port()))  # fmt: skip
    deepspeed.init_distributed(dist_backend="gloo")
    with tempfile.TemporaryDirectory() as tmp:
        plain_model, batch = model_and_batch(tmp, size)
        ds_model, _ = model_and_batch(tmp, size)
    params = ds_model.trainable_parameters()
    engine, *_ = deepspeed.initialize(model=ds_model, model_parameters=params,
                                      optimizer=torch.optim.AdamW(params, lr=1e-4),
                                      config={**DS_CONFIG, "zero_optimization": {"stage": 0}})  # fmt: skip
    plain_steps(plain_model, batch, 3), engine_steps(engine, batch, 3)  # warm-up
    plain, ds = [], []
    for _ in range(3):  # interleaved rounds, best of each
        plain.append(plain_steps(plain_model, batch, steps))
        ds.append(engine_steps(engine, batch, steps))
    p, d = min(plain), min(ds)
    print(
        f"step time: plain PyTorch {p * 1e3:.1f} ms, DeepSpeed ZeRO-0 {d * 1e3:.1f} ms, overhead {100 * (d / p - 1):+.1f}%"
    )


def _memory(rank, world, stage, precision, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = model_and_batch(tmp, "base")
    params = model.trainable_parameters()
    engine, opt, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                           optimizer=torch.optim.AdamW(params, lr=1e-4),
                                           config={**DS_CONFIG, "zero_optimization": {"stage": stage},
                                                   "bf16": {"enabled": precision == "bf16"}})  # fmt: skip
    loss, _ = covr_loss(engine, batch, LossConfig())
    engine.backward(loss)
    engine.step()
    seen, total = set(), 0

    def count(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for p in model.parameters():  # trainable and frozen weights this rank holds
        count(getattr(p, "ds_tensor", p) if stage == 3 else p)
        count(p.grad)
    for group in getattr(opt, "fp32_partitioned_groups_flat", []) + getattr(
        opt, "single_partition_of_fp32_groups", []
    ):
        count(group)
        count(group.grad)
    base = getattr(opt, "optimizer", opt)
    for state in base.state.values():
        for t in state.values():
            count(t)
    torch.save(total, f"{out}/mem{stage}{precision}_{rank}.pt")


def memory(precision: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        result = {}
        for stage in (0, 3):
            run_ranks(_memory, 2, (stage, precision, out))
            result[stage] = max(torch.load(f"{out}/mem{stage}{precision}_{r}.pt") for r in range(2))
    print(f"[{precision}] per-rank params+grads+optimizer state, 2 ranks: ZeRO-0 {result[0] / 2**20:.2f} MiB, "
          f"ZeRO-3 {result[3] / 2**20:.2f} MiB, ratio {result[3] / result[0]:.2f}")  # fmt: skip


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
