"""MLflow tracking from rank 0: training never waits on it, and no record is lost silently.

- Params, metrics and tags go out as `log_batch` records, sent by a background thread: the
  training thread only puts a record on a bounded queue (when it is full, the record goes to the
  buffer file at once), so a server that hangs or answers slowly costs the step loop nothing.
- The sender appends each record to `<out_dir>/mlflow_buffer.jsonl` first, then sends the
  buffer in order; what the server does not take (connection error, timeout, 5xx) stays there
  and is tried again at the next record, at most every `RETRY_S` during an outage (records in
  between only join the buffer), at `finish`, or by `flush_buffer`. `spill` (before every
  checkpoint) moves what is still queued to the buffer, so that a job killed after a checkpoint
  has every record up to it on disk for the resumed job to send.
- A record the server answers with a refusal (4xx: a param whose value changed, an invalid key)
  is not an outage: it is retried item by item, each refused key is reported once and dropped,
  and everything else goes on.
- A buffer line cut short by a kill is skipped and counted; the next append starts a new line.
- A resumed run (`run_id` given) compares params with those on the run instead of re-logging
  them (MLflow keeps the first value; a changed one is reported), and skips metric points at or
  before the step the run already has for that key (a run resumed from an earlier checkpoint
  computes them again).
- A new experiment keeps its artifacts beside a SQLite store (`<store dir>/mlartifacts`), not in
  `./mlruns` of whatever directory the command ran in; a tracking server decides for itself.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

KINDS = ("params", "metrics", "tags")
# 4xx answers that are not about the record itself: keep the record and replay it later
NOT_A_REFUSAL = {
    "UNAUTHENTICATED",
    "CUSTOMER_UNAUTHORIZED",
    "PERMISSION_DENIED",
    "ENDPOINT_NOT_FOUND",
    "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED",
}
DATABASES = {"sqlite", "postgresql", "mysql", "mssql"}
PENDING = 1024  # records queued for the sender; beyond, a record goes to the buffer file at once
RETRY_S = 10.0  # during an outage, how often the sender tries the server again
FINISH_WAIT_S = 60.0  # how long `finish` waits for the sender before closing the run
_STOP = object()
HANDOFF_POLL_S = 0.1  # the sender's wait for a record; `spill` waits at most this for it


def default_uri(out_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out_dir).resolve()}/mlflow.db"


def default_artifact_location(uri: str, out_dir: str | Path) -> str | None:
    """Where a new experiment's artifacts go when nobody says: beside a SQLite file, in the run
    directory for another database; None (the store's or server's own choice) otherwise."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in DATABASES:
        return None  # file store: artifacts inside it; http: the server's artifact root
    if scheme == "sqlite":
        path = uri.split("://", 1)[1][1:].split("?")[0]  # sqlite:///rel/x.db, sqlite:////abs/x.db
        if path and path != ":memory:":
            return str(Path(path).resolve().parent / "mlartifacts")
    return str(Path(out_dir).resolve() / "mlartifacts")


def ui_command(uri: str) -> str:
    """What a user runs to see the runs of `uri`; a local UI listens on 127.0.0.1 only."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {uri} (the tracking server serves the UI)"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port 5000"


def where_to_look(what: str, run_id: str, uri: str) -> str:
    """The lines a job ends with: its MLflow run and how to open the UI on it."""
    return f"MLflow {what} {run_id} in {uri}\n  open the UI: {ui_command(uri)}"


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


def is_refusal(err: Exception) -> bool:
    """The server answered and refused the record (retrying cannot help), as opposed to not
    answering (connection error, timeout, 5xx: worth buffering)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    return 400 <= err.get_http_status_code() < 500 and err.error_code not in NOT_A_REFUSAL


def _entities(record: dict) -> dict:
    """A buffered record as MLflow entities; raises ValueError/TypeError on a malformed one."""
    from mlflow.entities import Metric, Param, RunTag

    if not isinstance(record, dict) or not set(record) <= set(KINDS):
        raise ValueError(f"not a record: {record!r:.80}")
    return {
        "metrics": [
            Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in record.get("metrics", [])
        ],
        "params": [Param(str(k), str(v)) for k, v in record.get("params", [])],
        "tags": [RunTag(str(k), str(v)) for k, v in record.get("tags", [])],
    }


class Tracker:
    """One MLflow run. `enabled=False` (ranks other than 0) makes every call a no-op.

    `run_id` continues that run (a resume); `artifact_location` applies to an experiment this
    tracker creates (default: `default_artifact_location`)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        out_dir: str | Path,
        run_name: str = "",
        run_id: str | None = None,
        enabled: bool = True,
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
    ):
        self.enabled = enabled
        self.uri = uri
        self.run_id = run_id
        self.buffer = Path(out_dir) / "mlflow_buffer.jsonl"
        self.refused: dict[str, int] = {}  # key -> records refused by the server
        self.bad_lines = 0  # unreadable buffer lines skipped
        self.skipped_points = 0  # metric points a resumed run already had
        self.known_params: dict[str, str] | None = None  # on the run already (resume)
        self.last_step: dict[str, int] = {}  # newest step per metric on the run (resume)
        self.outage = False
        self.retry_at = 0.0  # during an outage: when the sender tries the server again
        self.client = None  # made at the first call that works (a database store connects then)
        self.to_read = run_id is not None  # a resumed run not read yet
        self.pending: queue.Queue = queue.Queue(maxsize=PENDING)
        self.buffer_lock = threading.Lock()  # the buffer file: the sender and `spill` write it
        # held by the sender from taking a record off the queue until it is in the buffer file,
        # and by `spill`: a record is always either queued or on disk when `spill` looks
        self.handoff = threading.Lock()
        self.sender: threading.Thread | None = None
        self.stuck = False  # the sender outlived `finish`'s wait: nothing more is sent here
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self.experiment, self.run_name, self.parent_run_id = experiment, run_name, parent_run_id
        self.artifact_location = artifact_location or default_artifact_location(uri, out_dir)
        self.explicit_location = bool(artifact_location)
        try:
            self._ensure_run()
        except Exception as err:  # the store is away: the run is created when it answers
            self._went_away(err)
        self.sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self.sender.start()

    # --- the run ---------------------------------------------------------------------------
    def _read_resumed_run(self) -> None:
        """What the resumed run holds already; a run this store does not have starts anew."""
        try:
            run = self.client.get_run(self.run_id)
        except Exception as err:
            if not is_refusal(err):
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning(
                "mlflow: run %s to resume is not in %s (or deleted); starting a new run",
                self.run_id,
                self.uri,
            )
            self.run_id = None
            return
        if run.info.status != "RUNNING":  # stopped by a signal (KILLED), now going on
            self.client.update_run(self.run_id, "RUNNING")
        self.known_params = dict(run.data.params)
        # the run's latest metrics carry their step (the newest one per key)
        self.last_step = {m.key: m.step for m in run.data._metric_objs}

    def _ensure_run(self) -> None:
        if self.client is None:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
        if self.to_read:
            self._read_resumed_run()
            self.to_read = False
        if self.run_id is not None:
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            exp_id = self.client.create_experiment(self.experiment, self.artifact_location)
        else:
            exp_id = exp.experiment_id
            if self.explicit_location and self.artifact_location not in exp.artifact_location:
                log.warning(
                    "mlflow: experiment %r keeps its artifacts in %s (set when it was "
                    "created); tracking.artifact_location=%s is not used",
                    self.experiment,
                    exp.artifact_location,
                    self.artifact_location,
                )
                self.explicit_location = False
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        self.run_id = self.client.create_run(
            exp_id, run_name=self.run_name or None, tags=tags
        ).info.run_id

    # --- logging ---------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        if self.known_params is not None:  # resumed: MLflow params cannot change
            for k, v in flat.items():
                if k in self.known_params and self.known_params[k] != v:
                    log.warning(
                        "mlflow: param %s of resumed run %s is %r now but stays %r "
                        "in MLflow (params cannot change)",
                        k,
                        self.run_id,
                        v,
                        self.known_params[k],
                    )
            flat = {k: v for k, v in flat.items() if k not in self.known_params}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self._send({"params": items[i : i + 100]})

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        self._send({"metrics": [(metric_name(k), float(v), now, step) for k, v in metrics.items()]})

    def _fresh(self, record: dict) -> dict:
        """Without the metric points the resumed run already has (known once it was read)."""
        items = record.get("metrics")
        if not items:
            return record
        fresh = [m for m in items if m[3] > self.last_step.get(m[0], -(2**62))]
        if len(fresh) < len(items):
            if not self.skipped_points:
                log.info(
                    "mlflow: resumed run %s already has step %d of %s; not logged again",
                    self.run_id,
                    items[0][3],
                    items[0][0],
                )
            self.skipped_points += len(items) - len(fresh)
        return {**record, "metrics": fresh}

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self._send({"tags": list(tags.items())})

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

    # --- delivery --------------------------------------------------------------------------
    def _send(self, record: dict) -> None:
        """The training thread's part: queue the record (never waits). After `finish` or
        `flush_buffer` stopped the sender, the caller sends itself."""
        if self.sender is None:
            self._append(record)
            if not self.stuck:
                self._flush()
            return
        try:
            self.pending.put_nowait(record)
        except queue.Full:  # the sender is far behind: the buffer keeps it
            self._append(record)

    def _take(self):
        """The next record, already in the buffer file (`handoff`); _STOP at the end."""
        while True:
            with self.handoff:
                try:
                    record = self.pending.get(timeout=HANDOFF_POLL_S)
                except queue.Empty:
                    continue
                if record is not _STOP:
                    try:
                        self._append(record)
                    except Exception as err:  # a full disk, say: the record is still sent
                        log.warning("mlflow: could not buffer a record (%s)", err)
                return record

    def _send_loop(self) -> None:
        while self._take() is not _STOP:
            try:
                if not self.outage or time.monotonic() >= self.retry_at:
                    self._flush()
            except Exception as err:  # never let the sender die: say it, keep the rest going
                log.warning("mlflow: sender error (%s); records stay in %s", err, self.buffer)
            finally:
                self.pending.task_done()
        self.pending.task_done()

    def _flush(self) -> None:
        try:
            self._replay()
        except Exception as err:
            self._went_away(err)
            self.retry_at = time.monotonic() + RETRY_S
            return
        self._answered()

    def drain(self) -> None:
        """Wait until the sender has handled every queued record (tests, `finish`)."""
        if self.sender is not None and self.sender.is_alive():
            self.pending.join()

    def spill(self) -> None:
        """Move what is still queued to the buffer file (before a checkpoint: on disk, so a
        job killed after it loses no record of the steps before it)."""
        if not self.enabled:
            return
        with self.handoff:  # the record the sender has taken is on disk already
            while True:
                try:
                    record = self.pending.get_nowait()
                except queue.Empty:
                    return
                if record is _STOP:  # not ours to take
                    self.pending.put(record)
                    self.pending.task_done()
                    return
                self._append(record)
                self.pending.task_done()

    def _deliver(self, record: dict) -> None:
        """Post one record; a refused one is split into items and the refused items dropped.
        Raises only when the server did not answer."""
        self._ensure_run()
        record = self._fresh(record)
        if not any(record.get(kind) for kind in KINDS):
            return
        try:
            self.client.log_batch(self.run_id, **_entities(record))
        except Exception as err:
            if not is_refusal(err):
                raise
            items = [(kind, item) for kind in KINDS for item in record.get(kind, [])]
            if len(items) > 1:
                for kind, item in items:
                    self._deliver({kind: [item]})
            elif items:
                self._refused(items[0], err)

    def _refused(self, item: tuple, err: Exception) -> None:
        kind, (key, value, *_) = item
        if key not in self.refused:
            reason = str(err).splitlines()[0][:300]
            log.warning(
                "mlflow refused %s %r = %r of run %s (%s); dropped, logging goes on",
                kind[:-1],
                key,
                value,
                self.run_id,
                reason,
            )
        self.refused[key] = self.refused.get(key, 0) + 1

    def _went_away(self, err: Exception) -> None:
        """Said once per outage, not at every step."""
        if not self.outage:
            reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            what = "refused to start the run" if is_refusal(err) else "did not answer"
            log.warning(
                "mlflow: %s %s (%s); buffering to %s and retrying at each call",
                self.uri,
                what,
                reason,
                self.buffer,
            )
        self.outage = True

    def _answered(self) -> None:
        if self.outage:
            log.warning("mlflow: %s answers again; buffered records sent", self.uri)
        self.outage = False

    # --- the buffer ------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        with self.buffer_lock:
            self.buffer.parent.mkdir(parents=True, exist_ok=True)
            with self.buffer.open("a+b") as f:
                if f.seek(0, os.SEEK_END):  # a line cut by a kill must not swallow this one
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write(json.dumps(record).encode() + b"\n")

    def _read_buffer(self, data: bytes) -> list[dict]:
        records, bad = [], []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                _entities(record)
                records.append(record)
            except (ValueError, TypeError):
                bad.append(n)
        if bad:
            self.bad_lines += len(bad)
            log.warning(
                "mlflow: skipped %d unreadable line(s) of %s (lines %s; cut by a kill?)",
                len(bad),
                self.buffer,
                ", ".join(map(str, bad[:10])),
            )
        return records

    def _replay(self) -> int:
        """Send buffered records in order; raises (keeping the unsent ones) if still no answer.
        Records appended while it sends stay after the unsent ones."""
        with self.buffer_lock:
            if not self.buffer.is_file():
                return 0
            data = self.buffer.read_bytes()
        records, sent = self._read_buffer(data), 0
        try:
            for record in records:
                self._deliver(record)
                sent += 1
        finally:
            with self.buffer_lock:
                later = self.buffer.read_bytes()[len(data) :] if self.buffer.is_file() else b""
                rest = "".join(json.dumps(r) + "\n" for r in records[sent:]).encode() + later
                if rest.strip():
                    tmp = self.buffer.with_suffix(".tmp")
                    tmp.write_bytes(rest)
                    os.replace(tmp, self.buffer)  # a kill here leaves the old buffer whole
                else:
                    self.buffer.unlink(missing_ok=True)
        return sent

    def flush_buffer(self) -> int:
        """Send what is buffered; returns how many records went out (0 if the server is away)."""
        if not self.enabled:
            return 0
        self._stop_sender()
        if self.stuck:
            return 0
        try:
            sent = self._replay()
        except Exception as err:
            self._went_away(err)
            return 0
        self._answered()
        return sent

    def register_model(self, name: str, export_dir: str | Path, tags: dict) -> str | None:
        """The export as a new version of the registered model `name` (created if new), linked
        to this run, `tags` on the version; its number, or None (with a warning) when the
        registry cannot be reached: registering is a convenience, the export is on disk."""
        if not self.enabled or not name:
            return None
        try:
            self._ensure_run()
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self.client.create_model_version(
                name,
                Path(export_dir).resolve().as_uri(),
                run_id=self.run_id,
                tags={
                    metric_name(k): str(round(v, 2) if isinstance(v, float) else v)
                    for k, v in tags.items()
                },
            )
        except Exception as err:
            reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            log.warning("mlflow: the export was not registered as %r (%s)", name, reason)
            return None
        log.info("mlflow: registered %s version %s (%s)", name, version.version, export_dir)
        return version.version

    def _stop_sender(self) -> None:
        """The sender's queue handled (or spilled to the buffer after `FINISH_WAIT_S`), the
        thread ended: from here the caller sends synchronously."""
        if self.sender is None or not self.sender.is_alive():
            return
        try:
            self.pending.put(_STOP, timeout=FINISH_WAIT_S)
            self.sender.join(FINISH_WAIT_S)
        except queue.Full:
            pass
        if self.sender.is_alive():  # still inside a request: the buffer stays its, for the next job
            log.warning(
                "mlflow: the sender is still waiting on %s; records stay buffered", self.uri
            )
            self.spill()
            self.stuck = True
        self.sender = None

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self._stop_sender()
        if self.stuck:  # a second sender of the same buffer would send records twice
            return
        try:
            self._replay()
            self._ensure_run()
            self.client.set_terminated(self.run_id, status)
            self._answered()
        except Exception as err:
            log.warning(
                "mlflow: run %s not closed (%s); buffered records stay in %s",
                self.run_id,
                err,
                self.buffer,
            )
        if self.refused:
            log.warning(
                "mlflow refused %d record(s) of run %s: %s",
                sum(self.refused.values()),
                self.run_id,
                ", ".join(sorted(self.refused)),
            )
