"""Gradient cache (`train.chunk_size`): peak memory and step time against the chunk size.

The project's DeepSpeed engine (one rank, ZeRO-0, fp32, AdamW, on the CPU) on the `base` BLIP-2
CoVR model (bench/train_bench.py) with packed target embeddings: the whole batch against chunks
of 1/4 and 1/16 of it. Memory: each setting in a fresh process (peak RSS is a high-water mark
that never comes down): peak RSS (`ru_maxrss`) after one step of the batch minus the peak after
a set-up step on 2 samples (model, gradients and Adam states allocated), i.e. what the batch's
activations add. Time: one process, the settings interleaved round by round, best of the rounds,
one torch thread: on the shared 2-core machine two intra-op threads wait for each other at every
op whenever the other is descheduled, which penalises many small ops (chunks) and measures the
machine's load, not the method.
On a GPU, bench/gpu.py measures the largest batch that fits with and without chunks.

    python bench/chunk_bench.py [--size base] [--batch-size 64] [--rounds 2] [--fractions 1 4 16]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup(size: str, batch_size: int):
    """The engine (one rank, ZeRO-0, fp32, AdamW), a batch, and `step(batch, chunk)`."""
    import torch

    from bench.train_bench import model_and_batch
    from configs import load_config
    from train.engine import build_engine, deepspeed_config, init_distributed
    from train.gradcache import chunked_backward
    from train.objective import COVR
    from train.optim import build_optimizer

    torch.set_num_threads(1)  # see main's --threads note
    init_distributed(600)
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = model_and_batch(tmp, size, batch_size)
    cfg = load_config(None, [f"train.batch_size={batch_size}", "deepspeed.zero_stage=0"])
    params = model.trainable_parameters()
    engine, *_ = build_engine(
        model, params, build_optimizer(params, cfg.optim), None, deepspeed_config(cfg)
    )

    def step(b, chunk):
        if chunk:
            chunked_backward(engine, b, COVR, cfg.loss, chunk)
        else:
            loss, _ = COVR.loss(engine, b, cfg.loss)
            engine.backward(loss)
        engine.step()

    step({k: v[:2] for k, v in batch.items()}, 0)  # allocates gradients and Adam states
    return batch, step


def memory_one(size: str, batch_size: int, chunk: int) -> dict:
    """In a fresh process: the peak after the set-up step, then after one step of the batch."""
    batch, step = setup(size, batch_size)
    base = peak_mib()
    step(batch, chunk)
    peak = peak_mib()
    return {
        "chunk_size": chunk,
        "peak_mib": peak,
        "setup_peak_mib": base,
        "activation_mib": peak - base,
    }


def timing(size: str, batch_size: int, chunks: list[int], rounds: int) -> dict:
    """Step times in one process, the settings interleaved round by round (the machine's load
    changes over minutes; a round compares them under the same load); best of the rounds."""
    batch, step = setup(size, batch_size)
    times: dict[int, list[float]] = {c: [] for c in chunks}
    for r in range(rounds + 1):  # round 0 warms each setting up
        for chunk in chunks if r % 2 else chunks[::-1]:
            start = time.perf_counter()
            step(batch, chunk)
            if r:
                times[chunk].append(time.perf_counter() - start)
    return {c: min(t) for c, t in times.items()} | {"all": times}


def child(args_list: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args_list]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fractions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", type=int, help=argparse.SUPPRESS)  # child: this chunk size
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # child
    args = parser.parse_args()
    chunks = [0 if f == 1 else args.batch_size // f for f in args.fractions]
    if args.memory is not None:
        return print(json.dumps(memory_one(args.size, args.batch_size, args.memory)))
    if args.timing:
        return print(json.dumps(timing(args.size, args.batch_size, chunks, args.rounds)))
    common = [
        "--size",
        args.size,
        "--batch-size",
        str(args.batch_size),
        "--fractions",
        *map(str, args.fractions),
    ]
    load = [os.getloadavg()[0]]
    rows = [child([*common, "--memory", str(c)]) for c in chunks]
    for r in rows:
        print(json.dumps(r), flush=True)
    load.append(os.getloadavg()[0])
    times = child([*common, "--timing", "--rounds", str(args.rounds)])
    load.append(os.getloadavg()[0])
    print(json.dumps(times), flush=True)
    whole, t0 = rows[0], times["0"]
    print(
        f"\n{args.size} model, batch {args.batch_size}, 1 rank ZeRO-0 fp32 (peak RSS); "
        f"load average {', '.join(f'{x:.1f}' for x in load)}"
    )
    print("| chunk | activation memory (peak) | vs whole | step time | vs whole |")
    print("|---|---|---|---|---|")
    for r in rows:
        c = r["chunk_size"]
        name = "whole batch" if c == 0 else f"{c} (1/{args.batch_size // c})"
        t = times[str(c)]
        print(
            f"| {name} | {r['activation_mib']:,.0f} MiB ({r['peak_mib']:,.0f}) | "
            f"{r['activation_mib'] / whole['activation_mib']:.2f}x | {t:.2f} s | {t / t0:.2f}x |"
        )


if __name__ == "__main__":
    main()
