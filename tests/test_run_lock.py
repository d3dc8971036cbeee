"""One job per train.out_dir: the second is refused naming the holder; a dead holder's lock is
taken over (same host: its process is gone; another host: its heartbeat is stale)."""

import json
import os
import subprocess
import sys
import time

import pytest

from train import run_lock
from train.run_lock import LOCK, RunDirLocked, RunLock


def _write(tmp_path, holder: dict | None, age_s: float = 0.0):
    path = tmp_path / LOCK
    path.write_text(json.dumps(holder) if holder is not None else "")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_second_job_is_refused_naming_the_holder_and_release_frees_it(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()} on .*job"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    second = RunLock(tmp_path)
    second.acquire()  # free again
    second.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket

    _write(tmp_path, {"host": socket.gethostname(), "pid": gone.pid, "started": 1.0, "job": "7"})
    lock = RunLock(tmp_path)
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert "taking over the lock of a job that is gone" in caplog.text
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    # this host, a live pid but another process's start time (a reused pid): dead too
    _write(tmp_path, {"host": socket.gethostname(), "pid": os.getpid(), "started": 1.0})
    lock.acquire()
    lock.release()


def _refused_while_fresh_taken_when_stale(tmp_path, holder, refusal: str) -> None:
    """A lock written `holder` refuses another job while young, and is taken over once its
    heartbeat is older than `run_lock.STALE_S`."""
    _write(tmp_path, holder, age_s=5)
    with pytest.raises(RunDirLocked, match=refusal):
        RunLock(tmp_path).acquire()
    _write(tmp_path, holder, age_s=run_lock.STALE_S + 1)
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_another_hosts_holder_is_trusted_while_its_heartbeat_is_fresh(tmp_path):
    holder = {"host": "node-17", "pid": 1, "started": 1.0, "job": "4242"}
    _refused_while_fresh_taken_when_stale(
        tmp_path, holder, "pid 1 on node-17 \\(job 4242, heartbeat 5 s ago\\)"
    )


def test_a_lock_file_cut_short_waits_for_its_age(tmp_path):
    _refused_while_fresh_taken_when_stale(tmp_path, None, "being written by another job")


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    then = time.time() - 1000
    os.utime(tmp_path / LOCK, (then, then))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 5
    lock.release()
