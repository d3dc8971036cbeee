"""Ray Tune sweeps: space checks before Ray, a 4-trial sweep with ASHA recorded in MLflow, and a
trial whose rank is killed being retried from its checkpoint. Real Ray, real deepspeed jobs."""

import json
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
from tests.multirank import in_fresh_process
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
    from tune.sweep import run_sweep

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
    sweep = load_sweep(
        write_sweep(
            tmp_path / "s.yaml",
            base_config,
            space=space,
            overrides=overrides,
            metric="meanR3",
            scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        )
    )
    summary = in_fresh_process(run_sweep, sweep, tmp_path / "sweep")
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
    from tune.sweep import run_sweep

    sweep = load_sweep(
        write_sweep(
            tmp_path / "s.yaml",
            base_config,
            space={"sampler.kind": {"grid": ["fs"]}},
            scheduler={"kind": "fifo"},
            max_failures=2,
        )
    )
    killed: list = []
    watcher = threading.Thread(
        target=_kill_a_rank_after_first_checkpoint, args=(tmp_path / "sweep", killed)
    )
    watcher.start()
    summary = in_fresh_process(run_sweep, sweep, tmp_path / "sweep")
    watcher.join()
    (trial,) = summary["trials"]
    assert killed, "the rank was never killed"
    assert trial["status"] == "completed" and trial["attempts"] == 2 and trial["steps"] == 12
    log = (tmp_path / "sweep" / "trials" / trial["trial_id"] / "train.log").read_text()
    assert "resumed from" in log
