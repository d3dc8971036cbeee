"""Run a sweep: Ray (local or `address`), a Tuner over `run_trial`, ASHA, and MLflow records.

The sweep is a parent MLflow run; each trial's training run is its child (the training loop
tags it with the parent id). When the Tuner ends, the parent gets the ranked results table, the
best config, and two plots (best recall per sampler x combiner, learning curves of all trials),
and `<out>/sweep.json` is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from configs.schema import load_config, to_dict
from sharding.local_ray import ray_init
from train.tracking import Tracker, default_uri, flatten
from tune.space import Sweep, overrides_of, ray_space
from tune.trial import ROOT, TrialSettings, read_validations, run_trial

log = logging.getLogger(__name__)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        max_t=s.max_t,
    )


def _start_ray(sweep: Sweep, address: str | None) -> bool:
    """Join `address`, or start a local Ray with enough logical CPUs that trials never wait on
    each other forever on a small machine. Returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    if address:
        ray_init(address, runtime_env=env)
        return True
    per_trial = sweep.resources.ranks * sweep.resources.cpus_per_rank
    logical = max(os.cpu_count() or 1, per_trial * max(1, sweep.max_concurrent))
    ray_init(None, num_cpus=logical, runtime_env=env, log_to_driver=False)  # 127.0.0.1 only
    return True


def _trial_rows(results, sweep: Sweep, out: Path) -> list[dict]:
    base = flatten(to_dict(load_config(sweep.base, overrides_of(sweep.overrides))))
    defaults = {k: base.get(k) for k in ("sampler.kind", "model.combiner")}
    rows = []
    for result in results:
        trial_dir = out / "trials" / Path(result.path).name  # Ray's trial dir is named by its id
        history = read_validations(trial_dir / "validation.jsonl", -1)
        if (trial_dir / "summary.json").is_file():
            status = "completed"
        elif result.error is not None:
            status = "error"
        else:
            status = "stopped_early"
        curve = [(h["step"], h["metrics"].get(_metric_key(sweep.metric))) for h in history]
        values = [v for _, v in curve if v is not None]
        attempts = trial_dir / "attempts.txt"
        failure = trial_dir / "failure.json"  # why the training failed (`tune.trial`)
        failure = json.loads(failure.read_text()) if status == "error" and failure.is_file() else {}
        error = failure.get("cause") or (
            str(result.error).splitlines()[0] if result.error else None
        )
        rows.append(
            {
                "trial_id": trial_dir.name,
                "config": dict(result.config),
                "status": status,
                "attempts": len(attempts.read_text().split()) if attempts.is_file() else 0,
                "final": history[-1]["metrics"] if history else {},
                "curve": curve,
                "best": (max(values) if sweep.mode == "max" else min(values)) if values else None,
                "steps": history[-1]["step"] if history else 0,
                "mlflow_run_id": history[-1]["mlflow_run_id"] if history else None,
                "resolved": defaults | dict(result.config),
                "error": error,
                "log": failure.get("log"),
                "trial_name": failure.get("trial_name"),
            }
        )
    reverse = sweep.mode == "max"
    missing = float("-inf") if reverse else float("inf")
    rows.sort(key=lambda r: missing if r["best"] is None else r["best"], reverse=reverse)
    return rows


def _metric_key(metric: str) -> str:
    """MLflow name -> the name in validation.jsonl (recall_at_1 -> R@1)."""
    return metric.replace("recall_at_", "R@")


def results_table(rows: list[dict], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["config"]})
    head = ["rank", "trial", "status", f"best {metric}", "steps", "attempts", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in enumerate(rows, 1):
        best = "-" if r["best"] is None else f"{r['best']:.2f}"
        cells = [str(n), r["trial_id"], r["status"], best, str(r["steps"]), str(r["attempts"])]
        cells += [str(r["config"].get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sampler_combiner(rows: list[dict], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    samplers = sorted({r["resolved"]["sampler.kind"] for r in rows})
    combiners = sorted({r["resolved"]["model.combiner"] for r in rows})
    grid = np.full((len(samplers), len(combiners)), np.nan)
    for r in rows:
        if r["best"] is None:
            continue
        i = samplers.index(r["resolved"]["sampler.kind"])
        j = combiners.index(r["resolved"]["model.combiner"])
        grid[i, j] = np.nanmax([grid[i, j], r["best"]])
    fig, ax = plt.subplots(figsize=(1.6 * len(combiners) + 2, 0.8 * len(samplers) + 1.5))
    image = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(combiners)), combiners)
    ax.set_yticks(range(len(samplers)), samplers)
    ax.set_xlabel("combiner")
    ax.set_ylabel("sampler")
    for i in range(len(samplers)):
        for j in range(len(combiners)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w")
    fig.colorbar(image, label=f"best val {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_learning_curves(rows: list[dict], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["curve"]:
            steps, values = zip(*r["curve"])
            ax.plot(steps, values, marker="o", label=f"{r['trial_id']} ({r['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"val {metric}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


STATE = "sweep_state.json"  # the parent run a `--resume` continues


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    address: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
) -> dict:
    """Run the sweep; `resume`: continue the one in `out_dir` whose driver died (Ray Tune's
    `Tuner.restore`): finished trials are kept, unfinished ones go on from their checkpoints,
    the MLflow parent run is the same."""
    from ray import tune

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    experiment = load_config(sweep.base, overrides_of(sweep.overrides)).tracking.experiment
    saved, ray_dir = out / STATE, out / "ray" / sweep.name
    if resume:
        if not saved.is_file() or not tune.Tuner.can_restore(str(ray_dir)):
            raise FileNotFoundError(f"{out}: no sweep to resume (no {STATE} or {ray_dir})")
        state = json.loads(saved.read_text())
        uri, parent_id = state["tracking_uri"], state["parent_run_id"]
    else:
        uri, parent_id = tracking_uri or default_uri(out), None
    parent = Tracker(uri, experiment, out, run_name=sweep.name, run_id=parent_id)
    saved.write_text(json.dumps({"tracking_uri": uri, "parent_run_id": parent.run_id}))
    parent.log_params(
        {
            "sweep": {
                "base": sweep.base,
                "metric": sweep.metric,
                "mode": sweep.mode,
                "scheduler": sweep.scheduler.kind,
                "num_samples": sweep.num_samples,
                "ranks_per_trial": sweep.resources.ranks,
            },
            "space": {k: json.dumps(v) for k, v in sweep.space.items()},
        }
    )
    settings = TrialSettings(
        base=sweep.base,
        fixed=overrides_of(sweep.overrides),
        out_dir=str(out),
        tracking_uri=uri,
        experiment=experiment,
        parent_run_id=parent.run_id,
        ranks=sweep.resources.ranks,
        threads_per_rank=max(1, int(sweep.resources.cpus_per_rank)),
    )
    resources = {
        "cpu": sweep.resources.ranks * sweep.resources.cpus_per_rank,
        "gpu": sweep.resources.ranks * sweep.resources.gpus_per_rank,
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), resources)
    started = _start_ray(sweep, address)
    try:
        tuner = (
            tune.Tuner.restore(str(ray_dir), trainable, resume_unfinished=True)
            if resume
            else _new_tuner(tune, trainable, sweep, out)
        )
        results = tuner.fit()
        rows = _trial_rows(results, sweep, out)
    finally:
        if started:
            import ray

            ray.shutdown()
    return _record(rows, sweep, out, parent)


def _new_tuner(tune, trainable, sweep: Sweep, out: Path):
    from ray.tune.search import BasicVariantGenerator

    return tune.Tuner(
        trainable,
        param_space=ray_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=_scheduler(sweep),
            num_samples=sweep.num_samples,
            search_alg=BasicVariantGenerator(
                random_state=sweep.seed, max_concurrent=sweep.max_concurrent
            ),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(out / "ray"),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        ),
    )


def _failed_trial_run(client, parent_run_id: str, row: dict) -> str | None:
    """The failed trial's MLflow child run (the one its training made, else a new one), tagged
    with the cause line and its log's path; its id (None if the store is away)."""
    try:
        experiment = client.get_run(parent_run_id).info.experiment_id
        name = row.get("trial_name") or row["trial_id"]
        run_id = row["mlflow_run_id"]
        if run_id is None:
            found = client.search_runs(
                [experiment],
                f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.run_name = '{name}'",
            )
            run_id = found[0].info.run_id if found else None
        if run_id is None:  # failed before training made its run (a setting refused)
            run_id = client.create_run(
                experiment, run_name=name, tags={"mlflow.parentRunId": parent_run_id}
            ).info.run_id
            for key, value in row["config"].items():
                client.log_param(run_id, key, value)
        client.set_tag(run_id, "covr.error", row["error"] or "?")
        if row.get("log"):
            client.set_tag(run_id, "covr.log", row["log"])
        return run_id
    except Exception as err:
        log.warning("mlflow: no child run for failed trial %s (%s)", row["trial_id"], err)
        return row["mlflow_run_id"]


def _record(rows: list[dict], sweep: Sweep, out: Path, parent: Tracker) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(parent.uri)
    for r in rows:  # a failed trial: a child run that says why, though training made none
        if r["status"] == "error":
            r["mlflow_run_id"] = _failed_trial_run(client, parent.run_id, r)
    for r in rows:  # a trial ASHA stopped (or that failed) leaves its run open: close it
        if r["mlflow_run_id"] and r["status"] != "completed":
            client.set_tag(r["mlflow_run_id"], "covr.status", r["status"])
            client.set_terminated(
                r["mlflow_run_id"], "KILLED" if r["status"] == "stopped_early" else "FAILED"
            )
    table = results_table(rows, sweep.metric)
    (out / "results.md").write_text(table + "\n")
    best = next((r for r in rows if r["best"] is not None), None)
    summary = {
        "mlflow_tracking_uri": parent.uri,
        "parent_run_id": parent.run_id,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "best": best
        and {"trial_id": best["trial_id"], "config": best["config"], sweep.metric: best["best"]},
        "trials": [
            {
                k: r[k]
                for k in (
                    "trial_id",
                    "config",
                    "status",
                    "attempts",
                    "final",
                    "best",
                    "steps",
                    "mlflow_run_id",
                    "error",
                    "log",
                )
            }
            for r in rows
        ],
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=1, default=str))
    if best:
        (out / "best_config.json").write_text(json.dumps(best["config"], indent=1))
        parent.log_params({"best": best["config"]})
        parent.log_metrics({f"best_{sweep.metric}": best["best"]}, 0)
        parent.log_artifact(out / "best_config.json")
    parent.log_metrics(
        {
            "trials_completed": sum(r["status"] == "completed" for r in rows),
            "trials_stopped_early": sum(r["status"] == "stopped_early" for r in rows),
        },
        0,
    )
    for path in (
        out / "results.md",
        out / "sweep.json",
        plot_sampler_combiner(rows, sweep.metric, out / "recall_by_sampler_combiner.png"),
        plot_learning_curves(rows, sweep.metric, out / "learning_curves.png"),
    ):
        parent.log_artifact(path)
    parent.finish()
    summary["table"] = table
    return summary
