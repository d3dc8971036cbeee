"""Sweep overhead: a 4-trial sweep (Ray Tune, FIFO, one trial at a time) against the same four
trainings launched directly one after the other (`deepspeed launch/train.py`), side by side.

    python bench/tune_bench.py [--steps 120] [--videos 200]

Both sides run the identical configs on the synthetic corpus (built once under --out); the
ratio is sweep wall time / sum of the direct runs' wall times.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.schema import CONFIG_DIR, load_config  # noqa: E402
from data.corpus import build_synthetic  # noqa: E402
from sharding.pack import pack_splits  # noqa: E402
from train.network import deepspeed_command  # noqa: E402
from tune.space import Scheduler, Sweep, check, overrides_of  # noqa: E402
from tune.sweep import run_sweep  # noqa: E402
from tune.trial import TRAIN_SCRIPT  # noqa: E402

SAMPLERS = ["random", "hns", "fs", "mix"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--videos", type=int, default=200)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="tune_bench_"))
    fixed = {
        "data.root": str(out / "corpus"),
        "shards.dir": str(out / "shards"),
        "model.tokenizer": str(out / "corpus" / "tokenizer"),
        "data.synth.videos": a.videos,
        "train.max_steps": a.steps,
        "train.eval_every": a.steps // 4,
        "train.ckpt_every": a.steps // 2,
        "eval.report_queries": 0,
        "deepspeed.zero_stage": 0,
    }
    base = str(CONFIG_DIR / "demo.yaml")
    cfg = load_config(base, overrides_of(fixed))
    build_synthetic(cfg.data.root, cfg.data.synth, cfg.data.mining)
    pack_splits(cfg.data.root, cfg.shards.dir, cfg.shards)

    direct = 0.0
    for sampler in SAMPLERS:
        cmd = deepspeed_command(
            TRAIN_SCRIPT,
            1,
            "--config",
            base,
            *overrides_of(fixed),
            f"sampler.kind={sampler}",
            f"train.out_dir={out / 'direct' / sampler}",
            launcher=(sys.executable, "-m", "deepspeed.launcher.runner"),
        )
        start = time.perf_counter()
        subprocess.run(
            cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        direct += time.perf_counter() - start
        print(f"direct {sampler:6s} {time.perf_counter() - start:6.1f} s", flush=True)

    sweep = Sweep(
        base=base,
        name="bench",
        overrides=fixed,
        space={"sampler.kind": {"grid": SAMPLERS}},
        scheduler=Scheduler(kind="fifo"),
        max_concurrent=1,
    )
    check(sweep)
    start = time.perf_counter()
    run_sweep(sweep, out / "sweep")
    swept = time.perf_counter() - start
    print(f"4 trainings of {a.steps} steps, 1 rank each, one at a time:")
    print(f"  direct (sum)  {direct:7.1f} s   1.00x")
    print(
        f"  Ray Tune      {swept:7.1f} s   {swept / direct:.2f}x   (overhead {swept - direct:+.1f} s)"
    )


if __name__ == "__main__":
    main()
