"""Chaos run: a 2-rank training interrupted at random moments and resumed each time must end
with the same weights as an uninterrupted run, and its MLflow history must have every step once
(with the same loss as the uninterrupted run).

  python bench/chaos.py [--out DIR] [--kills 5] [--steps 200] [--seed 0] [--signal KILL]
  python bench/chaos.py --signal TERM --eval-every 7 --out runs/chaos-term

A tiny model on a small synthetic corpus; checkpoints every few steps. Each interruption happens
at a random step (read from rank 0's console), after a random extra delay. `--signal KILL`:
`kill -9` to the whole job (launcher and ranks, as a lost node does). `TERM`: SIGTERM to the
whole job (scancel, Kubernetes), `USR1`: SIGUSR1 to the ranks (SLURM `--signal=B:USR1` trapped
by the batch script); both must stop at a step boundary with a checkpoint (`train.stop`), so
the next launch resumes from the step the signal came at: nothing is computed twice.
`--eval-every` puts validations among the moments. Writes DIR/chaos.json.
"""

import argparse
import json
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEP = re.compile(r" step (\d+)/\d+ ")


def prepare(out: Path, steps: int, ckpt_every: int, eval_every: int) -> Path:
    from configs.schema import MiningConfig, ShardConfig, SynthConfig
    from data.corpus import build_synthetic
    from sharding.pack import pack
    from tests.tiny import write_tiny_config

    corpus = out / "corpus"
    if not (corpus / "train.csv").exists():
        build_synthetic(
            corpus,
            SynthConfig(videos=60, family_size=5, frames=12, size=32, workers=2, seed=7),
            MiningConfig(val_fraction=0.2, test_fraction=0.2, seed=7),
        )
    cfg = ShardConfig(samples_per_shard=5, target_frames=3, workers=2, seed=1)
    for split in ("train", "val"):
        pack(corpus / f"{split}.csv", corpus / "videos", out / "shards" / split, cfg)
    # configs/tiny.yaml, run for `steps`; validations every `eval_every` steps
    return write_tiny_config(
        out / "chaos.yaml",
        out / "shards",
        corpus / "tokenizer",
        "optim.warmup_steps=5",
        f"train.max_steps={steps}",
        f"train.ckpt_every={ckpt_every}",
        "train.keep_checkpoints=2",
        f"train.eval_every={eval_every}",
        "eval.report_queries=0",
    )


class Job:
    """One `deepspeed` launch (2 ranks) whose console is followed for the current step."""

    def __init__(self, config: Path, out_dir: Path, log):
        from train.network import deepspeed_command, start_job

        cmd = deepspeed_command(
            ROOT / "launch/train.py", 2, "--config", config, f"train.out_dir={out_dir}"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = start_job(cmd, ROOT, env=env)
        self.step = 0
        self.reader = threading.Thread(target=self._follow, args=(log,), daemon=True)
        self.reader.start()

    def _follow(self, log) -> None:
        for line in self.proc.stdout:
            log.write(line)
            m = STEP.search(line)
            if m:
                self.step = int(m.group(1))

    def interrupt(self, sig: signal.Signals) -> int:
        """KILL / TERM to the whole job, USR1 to the ranks; waits for the job; its status."""
        if sig == signal.SIGUSR1:
            import psutil

            for p in psutil.Process(self.proc.pid).children(recursive=True):
                if "--local_rank" in " ".join(p.cmdline()):
                    p.send_signal(sig)
        else:
            os.killpg(self.proc.pid, sig)
        code = self.proc.wait()
        self.reader.join()
        return code

    def wait(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        return code


RESUMED = re.compile(r"resumed from \S*step(\d+)")


def run(
    config: Path, out_dir: Path, kill_at: list[tuple[int, float]], sig=signal.SIGKILL
) -> list[dict]:
    """Launch, interrupt with `sig` at each (step, extra delay), relaunch; until a launch
    finishes."""
    kills = []
    console = out_dir.parent / f"{out_dir.name}.console.log"
    with console.open("a") as log:
        for target, delay in kill_at:
            started = time.perf_counter()
            job = Job(config, out_dir, log)
            while job.proc.poll() is None and job.step < target:
                time.sleep(0.02)
            if job.proc.poll() is not None:
                raise RuntimeError(
                    f"the job ended before step {target} (exit {job.proc.returncode})"
                )
            time.sleep(delay)
            step, signalled = job.step, time.perf_counter()
            code = job.interrupt(sig)
            stopped = out_dir / "stopped.json"
            kills.append(
                {
                    "target_step": target,
                    "extra_delay_s": round(delay, 2),
                    "step_at_kill": step,
                    "seconds_into_launch": round(signalled - started, 1),
                    "exit_status": code,
                    "seconds_to_exit": round(time.perf_counter() - signalled, 2),
                    "stopped_at_step": json.loads(stopped.read_text())["step"]
                    if stopped.exists()
                    else None,
                }
            )
            print(f"{sig.name} at step {step} (target {target} + {delay:.2f} s)", flush=True)
        job = Job(config, out_dir, log)
        if job.wait() != 0:
            raise RuntimeError(f"the last launch failed; see {log.name}")
    resumed = [int(m.group(1)) for m in RESUMED.finditer(console.read_text())]
    for kill, step in zip(kills, resumed):
        kill["resumed_from_step"] = step
    return kills


def compare(a_dir: Path, b_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    a = load_file(a_dir / "export/model.safetensors")
    b = load_file(b_dir / "export/model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    ca, cb = (torch.load(d / "export/combiner.pt", weights_only=True) for d in (a_dir, b_dir))
    diff = max([diff] + [(ca[k] - cb[k]).abs().max().item() for k in ca])
    return {"tensors": len(a) + len(ca), "max_abs_diff": diff, "identical": diff == 0.0}


def history(run_dir: Path) -> dict:
    from mlflow import MlflowClient

    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(summary["mlflow_tracking_uri"])
    points = client.get_metric_history(summary["mlflow_run_id"], "loss")
    return {
        "run_id": summary["mlflow_run_id"],
        "steps": summary["steps"],
        "loss": sorted((p.step, p.value) for p in points),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="runs/chaos")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", choices=("KILL", "TERM", "USR1"), default="KILL")
    parser.add_argument("--eval-every", type=int, default=1000000, help="1000000: none")
    args = parser.parse_args(argv)
    sig = signal.Signals[f"SIG{args.signal}"]
    out = Path(args.out).resolve()
    for d in ("reference", "chaos"):
        if (out / d).exists():
            parser.exit(2, f"{out / d} exists: use a fresh --out\n")
    out.mkdir(parents=True, exist_ok=True)
    config = prepare(out, args.steps, args.ckpt_every, args.eval_every)
    rng = random.Random(args.seed)

    start = time.perf_counter()
    run(config, out / "reference", [])
    reference_s = time.perf_counter() - start
    targets = sorted(rng.sample(range(1, args.steps - 1), args.kills))
    kill_at = [(t, rng.uniform(0.0, 1.5)) for t in targets]
    start = time.perf_counter()
    kills = run(config, out / "chaos", kill_at, sig)
    chaos_s = time.perf_counter() - start

    weights = compare(out / "reference", out / "chaos")
    ref, got = history(out / "reference"), history(out / "chaos")
    steps = [s for s, _ in got["loss"]]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    missing = sorted(set(range(1, args.steps + 1)) - set(steps))
    ref_loss, got_loss = dict(ref["loss"]), {}
    for s, v in got["loss"]:
        got_loss.setdefault(s, v)
    loss_diff = max(abs(ref_loss[s] - got_loss[s]) for s in ref_loss if s in got_loss)
    result = {
        "steps": args.steps,
        "ckpt_every": args.ckpt_every,
        "eval_every": args.eval_every,
        "signal": sig.name,
        "seed": args.seed,
        "kills": kills,
        "weights": weights,
        "mlflow_loss_history": {
            "points": len(steps),
            "every_step_once": steps == list(range(1, args.steps + 1)),
            "repeated_steps": repeated,
            "missing_steps": missing,
            "max_abs_loss_diff_vs_reference": loss_diff,
        },
        "seconds": {"reference": round(reference_s, 1), "chaos_with_restarts": round(chaos_s, 1)},
    }
    ok = weights["max_abs_diff"] <= 1e-5 and result["mlflow_loss_history"]["every_step_once"]
    if sig != signal.SIGKILL:  # a stop at a step boundary: resumed there, nothing redone
        # (a signal at the last step is not a stop: that job finishes, validation and export)
        stopped_right = all(
            k.get("resumed_from_step") == k["stopped_at_step"] >= k["step_at_kill"]
            if k["stopped_at_step"] is not None
            else k.get("resumed_from_step") == args.steps
            for k in kills
        )
        result["every_stop_resumed_at_its_step"] = stopped_right
        ok = ok and stopped_right
    (out / "chaos.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
