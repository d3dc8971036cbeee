"""One trial = one real `deepspeed launch/train.py` job (the code path users launch by hand).

The Tune function below starts the deepspeed launcher for the trial's config, follows the
`validation.jsonl` the training loop writes on rank 0, and reports each new evaluation to Tune
(ASHA decides on them). The trial's directory is fixed by its trial id, so a retried trial
(`max_failures`) starts the same job with `train.resume=auto` and continues from its last
complete checkpoint. Stopping a trial (ASHA) ends the launcher's whole process group.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.network import deepspeed_command

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "launch" / "train.py"


@dataclass
class TrialSettings:
    base: str  # training config file
    fixed: list  # key=value overrides shared by all trials
    out_dir: str  # the sweep's directory; trials go under trials/<trial id>
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    ranks: int = 1
    threads_per_rank: int = 1
    poll_s: float = 1.0


def _die_with_parent() -> None:  # the launcher gets SIGTERM if the trial's worker dies
    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch_command(settings: TrialSettings, overrides: list[str], port: int) -> list[str]:
    launcher = (sys.executable, "-m", "deepspeed.launcher.runner")
    return deepspeed_command(
        TRAIN_SCRIPT,
        settings.ranks,
        "--config",
        settings.base,
        *overrides,
        port=port,
        launcher=launcher,
    )


def read_validations(path: Path, after_step: int) -> list[dict]:
    """New validation records (step > after_step), in order; a half-written last line waits."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record["step"] > after_step:
            out.append(record)
            after_step = record["step"]
    return out


# our launchers' one-line errors (`launch/_bootstrap.fail`), a stop, or a traceback's last line
ONE_LINE = re.compile(r"^(\[rank \d+\] )?([a-z]+ )*error: |^stopped by |^interrupted$")
TRACEBACK_END = re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*")


def failure_cause(log_tail: str) -> str:
    """The line of a failed training's log that says why: its one-line error if it printed one,
    else the last line of a traceback, else the last line."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    for pattern in (ONE_LINE, TRACEBACK_END):
        found = [line for line in lines if pattern.match(line)]
        if found:
            return found[-1][:500]
    return lines[-1][:500] if lines else "no output"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_trial(config: dict, settings: TrialSettings) -> None:
    """The Tune function trainable: `config` holds the sampled dotted keys."""
    from ray import tune

    from train.engine import free_port
    from train.tracking import metric_name

    context = tune.get_context()
    trial_dir = Path(settings.out_dir) / "trials" / context.get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    with (trial_dir / "attempts.txt").open("a") as f:  # one line per start (retries add lines)
        f.write(f"{time.time():.0f}\n")
    overrides = [
        *settings.fixed,
        *[f"{k}={v}" for k, v in config.items()],
        f"train.out_dir={trial_dir}",
        "train.resume=auto",
        f"tracking.uri={settings.tracking_uri}",
        f"tracking.experiment={settings.experiment}",
        f"tracking.run_name={context.get_trial_name()}",
        f"tracking.parent_run_id={settings.parent_run_id or ''}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads_per_rank), "PYTHONUNBUFFERED": "1"}
    cmd = launch_command(settings, overrides, free_port())
    log = (trial_dir / "train.log").open("ab")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
    )
    last_step = -1
    try:
        while True:
            done = proc.poll() is not None
            for record in read_validations(trial_dir / "validation.jsonl", last_step):
                last_step = record["step"]
                metrics = {metric_name(k): v for k, v in record["metrics"].items()}
                tune.report({**metrics, "step": record["step"]})
            if done:
                break
            time.sleep(settings.poll_s)
        if proc.returncode != 0:
            log_path = trial_dir / "train.log"
            cause = failure_cause(log_path.read_bytes()[-20000:].decode(errors="replace"))
            failure = {
                "cause": cause,
                "exit_status": proc.returncode,
                "log": str(log_path),
                "trial_name": context.get_trial_name(),
            }
            (trial_dir / "failure.json").write_text(json.dumps(failure, indent=1))
            raise RuntimeError(f"{cause} (exit {proc.returncode}; log {log_path})")
    finally:
        _stop(proc)
        log.close()
