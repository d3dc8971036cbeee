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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _runs_in(pgid: int, trial_dir: Path) -> bool:
    """Whether process group `pgid` still has a process of this trial (a pid, and so a group id,
    may since belong to something else)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid and str(trial_dir) in " ".join(p.info["cmdline"] or []):
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def _stop_group(pgid: int) -> None:
    """SIGTERM to the launcher's whole group (its ranks stop at a step boundary with a
    checkpoint: `train.stop`), SIGKILL after 60 s; returns when no process of it is left."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and _group_alive(pgid):
            time.sleep(0.2)
        if not _group_alive(pgid):
            return


def _stop(proc: subprocess.Popen) -> None:
    proc.poll()
    _stop_group(proc.pid)  # the runner may be gone while its launcher and ranks are not
    proc.poll()


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
    # an earlier attempt's job outlived its worker (the sweep's driver died): stop it first,
    # or this attempt would find its run directory locked
    pgid_file = trial_dir / "launcher.pgid"
    if pgid_file.is_file() and _runs_in(int(pgid_file.read_text()), trial_dir):
        _stop_group(int(pgid_file.read_text()))
    (trial_dir / "failure.json").unlink(missing_ok=True)
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
    pgid_file.write_text(str(proc.pid))  # its own session: the group id is its pid
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
