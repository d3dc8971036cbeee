"""Ray Tune sweeps: space checks before Ray, a 4-trial sweep with ASHA recorded in MLflow, and a
trial whose rank is killed being retried from its checkpoint. Real Ray, real deepspeed jobs."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from configs.schema import ConfigError, ShardConfig
from sharding.pack import pack
from tests.conftest import ROOT
from tests.tiny import write_tiny_config
from tune.space import load_sweep


@pytest.fixture(scope="module")
def base_config(small_corpus, tmp_path_factory):
    root, _ = small_corpus
    base = tmp_path_factory.mktemp("tune")
    cfg = ShardConfig(samples_per_shard=5, target_frames=3, workers=2, seed=1)
    for split in ("train", "val", "test"):
        pack(root / f"{split}.csv", root / "videos", base / "shards" / split, replace(cfg))
    return write_tiny_config(base / "base.yaml", base / "shards", root / "tokenizer")


def sweep_through_launcher(config: Path, out: Path, timeout: float = 420) -> dict:
    """The sweep as a user starts it (`launch/tune.py`), its `sweep.json`. A sweep that does
    not end in `timeout` seconds is killed and the test fails with the driver's output and each
    trial's log tail (what a hang looked like), not pytest's timeout."""
    cmd = [sys.executable, ROOT / "launch/tune.py", "--config", config, "--out", out]
    driver = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        output, _ = driver.communicate()
        logs = [f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(out.glob("trials/*/*.log"))]
        pytest.fail(
            f"sweep still running after {timeout} s:\n{output[-4000:].decode()}\n" + "\n".join(logs)
        )
    assert driver.returncode == 0, output[-4000:].decode()
    return json.loads((out / "sweep.json").read_text())


def write_sweep(path: Path, base: Path, **fields) -> Path:
    sweep = {
        "base": str(base),
        "name": "t",
        "overrides": {
            "train.max_steps": 12,
            "train.eval_every": 4,
            "train.ckpt_every": 4,
            "eval.report_queries": 0,
            "deepspeed.zero_stage": 0,
        },
        "space": {"sampler.kind": {"choice": ["random", "fs"]}},
        "resources": {"ranks": 1, "cpus_per_rank": 1},
        "max_concurrent": 1,
    }
    sweep.update(fields)
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize(
    "space, message",
    [
        (
            {"sampler.kind": {"choice": ["random", "zigzag"]}},
            "space key 'sampler.kind' value 'zigzag'",
        ),
        ({"optim.lrr": {"choice": [0.1]}}, "space key 'optim.lrr'"),
        ({"optim.lr": {"loguniform": [0.0, 1.0]}}, "loguniform needs low > 0"),
        ({"loss.beta": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
        ({"optim.lr": {"uniform": [1.0]}}, "needs [low, high]"),
    ],
)
def test_bad_search_space_entry_is_one_clear_error(base_config, tmp_path, space, message):
    path = write_sweep(tmp_path / "s.yaml", base_config, space=space)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert message in str(err.value)


def test_launcher_refuses_a_bad_sweep_before_ray_starts(base_config, tmp_path):
    import subprocess
    import sys

    path = write_sweep(tmp_path / "s.yaml", base_config, metric="loss")
    done = subprocess.run(
        [sys.executable, "launch/tune.py", "--config", str(path), "--out", str(tmp_path / "o")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "sweep key 'metric'" in done.stderr
    assert not (tmp_path / "o" / "ray").exists()


@pytest.mark.e2e
def test_sweep_asha_stops_weak_trials_and_records_child_runs(base_config, tmp_path):
    # designed case: trials run one at a time, strong (lr 3e-3) before weak (lr 1e-9); ASHA's
    # first rung then holds trained trials' recall and a weak trial falls below it. meanR3:
    # on a 10-video val gallery R@1 alone ties too often. Trials run long past the first rung, so
    # a stopped trial is visibly cut short
    space = {"optim.lr": {"grid": [3.0e-3, 1.0e-9]}, "model.combiner": {"grid": ["fusion", "mlp"]}}
    overrides = {
        "train.max_steps": 60,
        "train.eval_every": 6,
        "train.ckpt_every": 30,
        "eval.report_queries": 0,
        "deepspeed.zero_stage": 0,
    }
    config = write_sweep(
        tmp_path / "s.yaml",
        base_config,
        space=space,
        overrides=overrides,
        metric="meanR3",
        scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    summary = sweep_through_launcher(config, tmp_path / "sweep")
    trials = summary["trials"]
    assert len(trials) == 4
    stopped = [t for t in trials if t["status"] == "stopped_early"]
    assert any(t["steps"] < 60 for t in stopped)  # cut short of its 60 steps
    assert all(t["status"] == "stopped_early" for t in trials if t["config"]["optim.lr"] < 1e-6)
    assert summary["best"]["config"]["optim.lr"] == 3.0e-3
    assert any(t["status"] == "completed" for t in trials)
    on_disk = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert on_disk["parent_run_id"] == summary["parent_run_id"]
    client = MlflowClient(summary["mlflow_tracking_uri"])
    for t in trials:
        run = client.get_run(t["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
        assert run.data.params["optim.lr"] == str(t["config"]["optim.lr"])
        assert client.get_metric_history(run.info.run_id, "meanR3")
        assert run.info.status == ("FINISHED" if t["status"] == "completed" else "KILLED")
    parent = client.get_run(summary["parent_run_id"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "results.md",
        "best_config.json",
        "learning_curves.png",
        "recall_by_sampler_combiner.png",
    } <= artifacts
    assert parent.data.metrics["best_meanR3"] == summary["best"]["meanR3"]
    time.sleep(3)  # stopped trials' ranks were sent SIGTERM: none may outlive the sweep
    left = [
        " ".join(p.info["cmdline"])
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left


def _kill_a_rank_after_first_checkpoint(sweep_dir: Path, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        if list(sweep_dir.glob("trials/*/checkpoints/*/COMPLETE")):
            for p in psutil.process_iter(["cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "launch/train.py" in cmd and "--local_rank" in cmd and str(sweep_dir) in cmd:
                    p.kill()
                    killed.append(p.pid)
                    return
        time.sleep(0.2)


@pytest.mark.e2e
def test_a_trial_whose_rank_is_killed_is_retried_from_its_checkpoint(base_config, tmp_path):
    config = write_sweep(
        tmp_path / "s.yaml",
        base_config,
        space={"sampler.kind": {"grid": ["fs"]}},
        scheduler={"kind": "fifo"},
        max_failures=2,
    )
    killed: list = []
    watcher = threading.Thread(
        target=_kill_a_rank_after_first_checkpoint, args=(tmp_path / "sweep", killed)
    )
    watcher.start()
    summary = sweep_through_launcher(config, tmp_path / "sweep")
    watcher.join()
    (trial,) = summary["trials"]
    assert killed, "the rank was never killed"
    assert trial["status"] == "completed" and trial["attempts"] == 2 and trial["steps"] == 12
    log = (tmp_path / "sweep" / "trials" / trial["trial_id"] / "train.log").read_text()
    assert "resumed from" in log


def test_the_cause_of_a_failed_training_is_its_one_line_error_or_traceback_end():
    from tune.trial import failure_cause

    log = "2026 INFO train.loop: step 3/9\n[rank 0] non finite error: loss NaN / Inf in 11\n"
    assert failure_cause(log) == "[rank 0] non finite error: loss NaN / Inf in 11"
    assert failure_cause("x\nTraceback (most recent call last):\n  File y\nKeyError: 'z'\n") == (
        "KeyError: 'z'"
    )
    assert failure_cause("config error: key 'optim.lr': must be > 0\n") == (
        "config error: key 'optim.lr': must be > 0"
    )
    assert failure_cause("") == "no output"


@pytest.mark.e2e
def test_a_trial_whose_settings_fail_gets_a_failed_child_run_with_its_cause(base_config, tmp_path):
    tokenizer = yaml.safe_load(base_config.read_text())["model"]["tokenizer"]
    config = write_sweep(
        tmp_path / "s.yaml",
        base_config,
        space={"model.tokenizer": {"grid": [tokenizer, "/no/such/tokenizer"]}},
        scheduler={"kind": "fifo"},
        max_failures=0,
    )
    summary = sweep_through_launcher(config, tmp_path / "sweep")
    by_status = {t["status"]: t for t in summary["trials"]}
    assert set(by_status) == {"completed", "error"}
    failed = by_status["error"]
    assert "key 'model.tokenizer': /no/such/tokenizer does not exist" in failed["error"]
    assert failed["log"].endswith("train.log") and Path(failed["log"]).is_file()
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(failed["mlflow_run_id"])  # made for it: training never got that far
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    assert "/no/such/tokenizer does not exist" in run.data.tags["covr.error"]
    assert run.data.tags["covr.log"] == failed["log"]
    assert run.data.params["model.tokenizer"] == "/no/such/tokenizer"
    on_disk = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [t["error"] for t in on_disk["trials"] if t["status"] == "error"] == [failed["error"]]


@pytest.mark.e2e
def test_a_sweep_whose_driver_is_killed_resumes(base_config, tmp_path):
    """The driver (and the local Ray it started) is killed while the second trial trains;
    `--resume` keeps the finished trial, continues the other from its checkpoint and reuses
    the MLflow parent run."""
    config = write_sweep(
        tmp_path / "s.yaml",
        base_config,
        space={"sampler.kind": {"grid": ["random", "fs"]}},
        scheduler={"kind": "fifo"},
    )
    out = tmp_path / "sweep"
    cmd = [sys.executable, ROOT / "launch/tune.py", "--config", config, "--out", out]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune's state saved often
    driver = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 400
    while time.time() < deadline:  # the first trial done, the second one training
        done = list(out.glob("trials/*/summary.json"))
        started = list(out.glob("trials/*/checkpoints/*/COMPLETE"))
        if done and any(p.parents[2] != done[0].parent for p in started):
            break
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    time.sleep(2)
    parent_before = json.loads((out / "sweep_state.json").read_text())["parent_run_id"]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    first = done[0].parent.name
    time.sleep(5)  # the trial's training stops with its worker (fate-shared with the driver)
    resumed = subprocess.run(
        cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["parent_run_id"] == parent_before
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials.values())
    assert trials[first]["attempts"] == 1  # kept, not run again
    (other,) = [t for k, t in trials.items() if k != first]
    assert other["attempts"] == 2 and other["steps"] == 12
    log = (out / "trials" / other["trial_id"] / "train.log").read_text()
    assert "resumed from" in log
    client = MlflowClient(summary["mlflow_tracking_uri"])
    assert client.get_run(parent_before).info.status == "FINISHED"
    for t in trials.values():
        assert client.get_run(t["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent_before
