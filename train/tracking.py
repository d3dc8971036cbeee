"""MLflow tracking from rank 0, robust to an unreachable server.

Metrics are sent as they come; when the tracking server does not answer, they are appended to
`<out_dir>/mlflow_buffer.jsonl` and re-sent (in order, then removed from the buffer) at the next
call that reaches the server, at the end of the run, or later with `flush_buffer`. Training
never waits on MLflow longer than one short request timeout.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def default_uri(out_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out_dir).resolve()}/mlflow.db"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def metric_name(name: str) -> str:
    """MLflow's rules: no '@' (R@1 -> recall_at_1)."""
    return name.replace("R@", "recall_at_").replace("@", "_at_")


class Tracker:
    """One MLflow run. `enabled=False` (ranks other than 0) makes every call a no-op."""

    def __init__(self, uri: str, experiment: str, out_dir: str | Path, run_name: str = "",
                 run_id: str | None = None, enabled: bool = True, parent_run_id: str | None = None):  # fmt: skip
        self.enabled = enabled
        self.uri = uri
        self.run_id = run_id
        self.buffer = Path(out_dir) / "mlflow_buffer.jsonl"
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.experiment, self.run_name, self.parent_run_id = experiment, run_name, parent_run_id
        try:
            self._ensure_run()
        except Exception as err:  # the server is away: the run is created when it answers
            log.warning(
                "mlflow unreachable at start (%s); buffering to %s", type(err).__name__, self.buffer
            )

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        self.run_id = self.client.create_run(
            exp_id, run_name=self.run_name or None, tags=tags
        ).info.run_id

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self._send({"params": [(p.key, p.value) for p in flat[i : i + 100]]})

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        items = [(metric_name(k), float(v), now, step) for k, v in metrics.items()]
        self._send({"metrics": items})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            try:
                self._ensure_run()
                path = Path(path)
                if path.is_dir():  # a folder keeps its name under artifact_path
                    sub = f"{artifact_path}/{path.name}" if artifact_path else path.name
                    self.client.log_artifacts(self.run_id, str(path), sub)
                else:
                    self.client.log_artifact(self.run_id, str(path), artifact_path)
            except Exception as err:  # artifacts are files on disk already: say so, go on
                log.warning("mlflow: could not upload %s (%s); it stays at that path", path, err)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self._send({"tags": list(tags.items())})

    def _post(self, record: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._ensure_run()
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, ts, s) for k, v, ts, s in record.get("metrics", [])],
            params=[Param(k, v) for k, v in record.get("params", [])],
            tags=[RunTag(k, str(v)) for k, v in record.get("tags", [])],
        )

    def _send(self, record: dict) -> None:
        try:
            self.flush_buffer()
            self._post(record)
        except Exception as err:
            log.warning("mlflow unreachable (%s); buffering to %s", type(err).__name__, self.buffer)
            self.buffer.parent.mkdir(parents=True, exist_ok=True)
            with self.buffer.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def flush_buffer(self) -> int:
        """Send buffered records; raises (keeping the unsent ones) if the server is still away."""
        if not self.enabled or not self.buffer.is_file():
            return 0
        records = [
            json.loads(line) for line in self.buffer.read_text().splitlines() if line.strip()
        ]
        for i, record in enumerate(records):
            try:
                self._post(record)
            except Exception:
                self.buffer.write_text("".join(json.dumps(r) + "\n" for r in records[i:]))
                raise
        self.buffer.unlink()
        return len(records)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        try:
            self.flush_buffer()
            self._ensure_run()
            self.client.set_terminated(self.run_id, status)
        except Exception as err:
            log.warning(
                "mlflow: run %s not closed (%s); buffered metrics stay in %s",
                self.run_id,
                err,
                self.buffer,
            )
