"""One job per `train.out_dir`: a requeued job started while the old one still runs (or a second
job pointed at the same directory by mistake) must not interleave checkpoints or MLflow steps.

Rank 0 creates `out_dir/LOCK` atomically (O_EXCL) holding its host, pid, process start time
and scheduler job id, and refreshes its modification time from a background thread every
`HEARTBEAT_S`. A second job is refused, naming the holder. A dead holder's lock does not block
for ever: on the same host a holder whose process is gone (or is another process with its pid)
is dead at once; on another host, when the heartbeat is older than `STALE_S`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import psutil

from train.distributed import broadcast_from_rank0

log = logging.getLogger(__name__)

LOCK = "LOCK"
HEARTBEAT_S = 15.0
STALE_S = 120.0  # 8 heartbeats missed: the holder's node is gone


class RunDirLocked(RuntimeError):
    """Another job holds the run directory."""


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": psutil.Process().create_time(),
        "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("HOSTNAME", ""),
    }


def _holder_alive(holder: dict, age_s: float) -> bool:
    if holder.get("host") != socket.gethostname():
        return age_s < STALE_S
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder["started"])) < 1.0  # not a reused pid
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise `RunDirLocked`; a dead holder's lock is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a dead lock removed, then the race for the new one
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock")
            self._thread.start()
            return
        raise RunDirLocked(f"{self.path}: could not be taken (another job keeps taking it)")

    def _take_over_or_refuse(self) -> None:
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return  # released meanwhile
        except ValueError:  # cut short when written: judged by its age alone
            holder, age = {}, time.time() - self.path.stat().st_mtime
        if holder and _holder_alive(holder, age):
            raise RunDirLocked(
                f"train.out_dir {self.path.parent} is in use by pid {holder.get('pid')} on "
                f"{holder.get('host')} (job {holder.get('job') or '?'}, heartbeat {age:.0f} s "
                f"ago); wait for it to end, or give this job another train.out_dir. A dead "
                f"job's lock is taken over (same host: at once; another: after {STALE_S:.0f} s)"
            )
        if not holder and age < STALE_S:
            raise RunDirLocked(f"{self.path}: being written by another job; try again")
        # two jobs may both judge it dead: only one renames it away, and only if it is still
        # the lock judged (not one a quicker job has just made)
        aside = self.path.with_name(f"{LOCK}.dead-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another job took it first: try again
        try:
            same = json.loads(aside.read_text() or "{}") == holder
        except ValueError:
            same = not holder
        if not same:
            os.rename(aside, self.path)  # a live job's new lock: give it back
            raise RunDirLocked(f"{self.path}: taken over by another job just now; try again")
        log.warning("%s: taking over the lock of a job that is gone (%s)", self.path, holder)
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as err:  # the directory went away: nothing left to guard
                log.warning("%s: heartbeat failed (%s)", self.path, err)

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def lock_run_dir(out_dir: str | Path, rank: int) -> RunLock | None:
    """Rank 0 takes the lock; every rank learns the outcome (the refusal is raised everywhere,
    before any rank touches the directory's checkpoints). Returns rank 0's lock."""
    lock, refusal = RunLock(out_dir) if rank == 0 else None, None
    if lock is not None:
        try:
            lock.acquire()
        except Exception as err:  # refused, or the directory cannot be written: every rank stops
            refusal = str(err) if isinstance(err, RunDirLocked) else f"{lock.path}: {err}"
    refusal = broadcast_from_rank0(refusal)
    if refusal:
        raise RunDirLocked(refusal)
    return lock
