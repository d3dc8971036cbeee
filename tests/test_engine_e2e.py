"""The training engine through the real deepspeed launcher: 2 CPU ranks (gloo), own port each."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from configs.schema import ShardConfig
from sharding.batch import Task
from sharding.pack import pack
from tests.conftest import ROOT
from tests.tiny import write_tiny_config
from train.network import deepspeed_command, start_job

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup(small_corpus, tmp_path_factory):
    root, _ = small_corpus
    base = tmp_path_factory.mktemp("engine")
    cfg = ShardConfig(samples_per_shard=5, target_frames=3, workers=2)
    for split in ("train", "val", "test"):
        pack(root / f"{split}.csv", root / "videos", base / "shards" / split, replace(cfg, seed=1))
    return write_tiny_config(base / "cfg.yaml", base / "shards", root / "tokenizer")


def launch(config, out_dir, *overrides, ranks=2, wait=True):
    args = ("--config", config, f"train.out_dir={out_dir}", *overrides)
    proc = start_job(deepspeed_command(ROOT / "launch/train.py", ranks, *args), ROOT)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    (Path(out_dir) / "console.log").write_text(out)
    return json.loads((Path(out_dir) / "summary.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train_checkpoint_export_and_track(setup, tmp_path, stage):
    out = tmp_path / f"z{stage}"
    precision = "bf16" if stage == 3 else "fp32"  # bf16 runs on CPU too
    summary = launch(
        setup,
        out,
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.precision={precision}",
        "tracking.system_metrics_s=1",
    )
    assert summary["steps"] > 2 and set(summary["val"]) >= {"R@1", "R@5", "R@10", "meanR3"}
    tags = sorted(p.parent.name for p in (out / "checkpoints").glob("*/COMPLETE"))
    assert tags and tags[-1] == f"step{summary['steps']:08d}"
    # DeepSpeed's zero_to_fp32.py reads `latest`: written by us, after COMPLETE
    assert (out / "checkpoints/latest").read_text() == tags[-1]
    # export: transformers from_pretrained + our loader, finite embeddings
    from transformers import Blip2ForImageTextRetrieval

    from train.export import load_exported

    Blip2ForImageTextRetrieval.from_pretrained(out / "export", local_files_only=True)
    model, tok = load_exported(out / "export")
    model.eval()
    emb = model(Task.ENCODE_TARGET_FRAMES, torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 4, 16) and torch.isfinite(emb).all()
    # MLflow: metrics read back through the client
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["deepspeed.zero_stage"] == str(stage)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == summary["steps"]
    assert client.get_metric_history(run.info.run_id, "recall_at_1")
    assert "samples_per_s" in run.data.metrics and "data_wait_s" in run.data.metrics
    # each node's system metrics (one node here: the ranks' local rank 0), named by node
    import socket

    node = f"system/node0-{socket.gethostname()}"
    assert f"{node}/cpu_utilization_percentage" in run.data.metrics
    assert f"{node}/system_memory_usage_megabytes" in run.data.metrics
    # the export, a new version of the registered model, linked to the run, recalls as tags
    version = client.get_model_version("covr", summary["registered"])
    assert version.run_id == run.info.run_id and version.source.endswith("/export")
    assert float(version.tags["recall_at_1"]) == round(summary["val"]["R@1"], 2)
    assert version.tags["step"] == str(summary["steps"])
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/retrievals.png", "report/index.html", "report/recall.png"} <= report
    # the console: rank 0 speaks for the job, once
    console = (out / "console.log").read_text()
    assert console.count("building the job") == 1
    # ranks are told the accelerator (launch/_bootstrap.py); the launcher's two processes, which
    # start before our code, may still guess (launch/demo.py tells them too)
    assert console.count("Setting accelerator to CPU") <= 2
    assert console.count('"mlflow_run_id"') == 1  # the summary, printed by rank 0 only
    assert f"step {summary['steps']}/{summary['steps']}" in console and " left " in console
    assert console.count("validation at step") == len(
        client.get_metric_history(run.info.run_id, "recall_at_1")
    )
    assert "checkpoint saved: " in console and "R@1 " in console


@pytest.fixture(scope="module")
def full(setup, tmp_path_factory):
    """The uninterrupted run the interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("full")
    return launch(setup, out), out


def _same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(a_dir / "export/model.safetensors")
    b = load_file(b_dir / "export/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_kill_and_resume_reaches_the_same_weights(setup, full, tmp_path):
    full, full_dir = full
    proc = launch(setup, tmp_path / "killed", wait=False)
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and not (tmp_path / "killed/checkpoints/step00000004/COMPLETE").exists()
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, launcher and ranks
    proc.wait()
    assert not (tmp_path / "killed/summary.json").exists(), "killed too late"
    resumed = launch(setup, tmp_path / "killed")
    assert resumed["steps"] == full["steps"]
    # the killed job's lock was left behind: its process is gone, so it was taken over
    assert (
        "taking over the lock of a job that is gone"
        in (tmp_path / "killed/console.log").read_text()
    )
    assert not (tmp_path / "killed/LOCK").exists()  # released at the end
    _same_weights(full_dir, tmp_path / "killed")
    history = MlflowClient(resumed["mlflow_tracking_uri"]).get_metric_history(
        resumed["mlflow_run_id"], "loss"
    )
    assert (
        resumed["mlflow_run_id"]
        == json.loads((tmp_path / "killed/summary.json").read_text())["mlflow_run_id"]
    )
    assert sorted(m.step for m in history) == list(range(1, full["steps"] + 1))  # each step once


def test_remote_shards_over_a_flaky_server_kill_and_resume_reach_the_same_weights(
    setup, full, tmp_path
):
    """shards.dir an http:// URL on a server that fails and drops connections: killed with
    SIGKILL mid-run, resumed (with the shard cache on), the weights are the local run's."""
    from tests.flaky_http import Faults, serve

    full, full_dir = full
    out = tmp_path / "remote"
    with serve(setup.parent / "shards", Faults(error=0.05, drop=0.05, seed=9)) as (url, faults):
        remote = (f"shards.dir={url}", "shards.retry_wait_s=0.05")
        proc = launch(setup, out, *remote, wait=False)
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoints/step00000004/COMPLETE").exists():
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "summary.json").exists(), "killed too late"
        resumed = launch(setup, out, *remote, f"shards.cache_dir={tmp_path / 'cache'}")
        assert faults.injected["error"] + faults.injected["drop"] > 0
    assert resumed["steps"] == full["steps"]
    _same_weights(full_dir, out)
    assert list((tmp_path / "cache").glob("*.tar"))  # the resumed job kept what it read


def test_bad_config_value_fails_before_training(setup, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch/train.py"),
            "--config",
            str(setup),
            "deepspeed.zero_stage=7",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "key 'deepspeed.zero_stage'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _is_rank(p) -> bool:
    import psutil

    try:
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False
    return "launch/train.py" in cmd and "--local_rank" in cmd


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def test_a_second_job_on_the_same_out_dir_is_refused_naming_the_first(setup, tmp_path):
    out = tmp_path / "shared"
    first = launch(setup, out, "train.epochs=1000", "train.ckpt_every=0", wait=False)
    try:
        _ranks(first)
        deadline = time.time() + 120
        while not (out / "LOCK").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.1)
        holder = json.loads((out / "LOCK").read_text())
        second = subprocess.run(
            [sys.executable, ROOT / "launch/train.py", "--config", setup, f"train.out_dir={out}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = [x for x in second.stderr.splitlines() if "run dir locked" in x]
        assert f"in use by pid {holder['pid']} on {holder['host']}" in line
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first job goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_a_diverging_run_never_saves_non_finite_weights(setup, tmp_path):
    """optim.lr=1e6 at ZeRO-0, a checkpoint every step: the job stops with one line, every
    checkpoint left is finite, no export; the NaN losses are skipped up to the limit."""
    out = tmp_path / "diverged"

    def train(*overrides):
        return subprocess.run(
            [sys.executable, ROOT / "launch/train.py", "--config", setup, f"train.out_dir={out}"]
            + ["optim.lr=1e6", "deepspeed.zero_stage=0", "train.resume=none", *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = train("train.ckpt_every=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # whichever comes first: a checkpoint of non-finite weights, or the NaN losses' limit
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("non finite error: ")]
    assert "the weights are not finite (parameter " in line or "micro-batches" in line
    for tag in (out / "checkpoints").glob("step*/COMPLETE"):
        state = torch.load(
            next(tag.parent.glob("**/mp_rank_00_model_states.pt")), weights_only=False
        )
        assert all(
            torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point()
        )
    assert not (out / "export").exists()
    proc = train("train.ckpt_every=0", "train.nonfinite_limit=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "loss NaN / Inf in 4 micro-batches (train.nonfinite_limit=3)" in proc.stderr
    assert proc.stderr.count("micro-batch skipped") == 3 and not (out / "export").exists()


def test_a_dead_rank_ends_the_job(setup, tmp_path):
    import psutil

    proc = launch(setup, tmp_path / "dead", "train.epochs=1000", "train.ckpt_every=0", wait=False)
    deadline = time.time() + 300
    ranks = []
    while time.time() < deadline:
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_rank(p)]
        if len(ranks) == 2 and list((tmp_path / "dead").glob("mlflow.db")):
            break
        time.sleep(0.2)
    time.sleep(3)  # inside the step loop
    ranks[1].kill()
    killed_at = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60
    assert not any(_alive(p) for p in ranks)


class Console:
    """A started job's console, read line by line in a thread (to wait for a step)."""

    def __init__(self, proc):
        import threading

        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout=300) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert time.time() < deadline and self.proc.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.05)

    def finish(self, timeout=300) -> str:
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return "".join(self.lines)


def _ranks(proc) -> list:
    import psutil

    deadline = time.time() + 120
    while time.time() < deadline:
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_rank(p)]
        if len(ranks) == 2:
            return ranks
        time.sleep(0.1)
    raise AssertionError("the ranks did not start")


LONGER = ("train.epochs=8",)


def test_preemption_signals_stop_at_a_step_with_a_checkpoint_and_resume_exactly(setup, tmp_path):
    """SIGUSR1 to the ranks (SLURM --signal=B:USR1 trapped by the batch script) and SIGTERM to
    the whole job (launcher included, as scancel or Kubernetes send it), each at a random
    moment; the job ends where an uninterrupted one does, every MLflow step logged once."""
    import random

    full_dir = tmp_path / "full"  # long enough that each signal lands inside training
    full = launch(setup, full_dir, *LONGER)
    out, rng = tmp_path / "preempted", random.Random(0)
    stops = []
    for sig, to_group, after in ((signal.SIGUSR1, False, "step 2/"), (signal.SIGTERM, True, None)):
        console = Console(launch(setup, out, *LONGER, wait=False))
        ranks = _ranks(console.proc)
        console.wait_for(after or f"step {stops[-1] + 1}/")
        time.sleep(rng.uniform(0, 0.2))
        if to_group:
            os.killpg(console.proc.pid, sig)
        else:
            for rank in ranks:
                rank.send_signal(sig)
        text = console.finish()
        assert "Traceback" not in text, text[-3000:]
        stopped = json.loads((out / "stopped.json").read_text())
        step = stopped["step"]
        assert stopped["signal"] == sig.name and step < full["steps"]
        assert f"stopped by {sig.name} at step {step}: checkpoint" in text
        assert (out / f"checkpoints/step{step:08d}/COMPLETE").exists()
        assert not (out / "summary.json").exists()
        if not to_group:  # the ranks' status comes through DeepSpeed's launcher
            assert console.proc.returncode == 75, text[-3000:]
        stops.append(step)
    resumed = launch(setup, out, *LONGER)
    console = (out / "console.log").read_text()
    assert f"resumed from {out / 'checkpoints'}/step{stops[-1]:08d}" in console
    assert not (out / "stopped.json").exists()
    assert resumed["steps"] == full["steps"] and resumed["mlflow_run_id"]
    _same_weights(full_dir, out)
    client = MlflowClient(resumed["mlflow_tracking_uri"])
    history = client.get_metric_history(resumed["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, full["steps"] + 1))  # each once
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["covr.stopped"].startswith("SIGTERM")
