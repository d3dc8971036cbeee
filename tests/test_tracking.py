import json
import logging
import shlex
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import requests
from mlflow import MlflowClient
from PIL import Image

from tests.multirank import free_port
from train.tracking import (
    Tracker,
    default_artifact_location,
    default_uri,
    flatten,
    metric_name,
    ui_command,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds): <root>/run/mlflow.db."""
    root = tmp_path_factory.mktemp("store")
    (root / "run").mkdir()
    return SimpleNamespace(root=root, dir=root / "run", uri=f"sqlite:///{root}/run/mlflow.db")


def test_names_and_flattening():
    assert metric_name("R@1") == "recall_at_1" and metric_name("val/R@10") == "val/recall_at_10"
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_sqlite_store_round_trip(store, tmp_path):
    uri = store.uri
    t = Tracker(uri, "exp", tmp_path, run_name="r1")
    t.log_params({"model": {"arch": "blip2"}, "optim": {"lr": 1e-4}})
    for step in range(3):
        t.log_metrics({"loss": 1.0 / (step + 1), "R@1": 10.0 * step}, step)
    t.finish()
    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert run.data.params["model.arch"] == "blip2" and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(t.run_id, "recall_at_1")] == [
        0.0,
        10.0,
        20.0,
    ]


def _history(uri, run_id, key="loss"):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def _messages(caplog, needle):
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# --- artifacts stay with the store --------------------------------------------------------------
def test_artifact_location_rules(tmp_path):
    out = tmp_path / "out"
    assert default_artifact_location(f"sqlite:///{out}/mlflow.db", out) == str(out / "mlartifacts")
    assert default_artifact_location("sqlite:///rel/x.db?timeout=5", out).endswith(
        "/rel/mlartifacts"
    )
    assert default_artifact_location("postgresql+psycopg2://u@h/db", out) == str(
        out / "mlartifacts"
    )
    assert default_artifact_location("http://127.0.0.1:5000", out) is None  # the server decides
    assert default_artifact_location(f"file://{out}/mlruns", out) is None  # inside the file store
    hint = ui_command(f"sqlite:///{out}/mlflow.db")
    assert f"--backend-store-uri sqlite:///{out}/mlflow.db" in hint and "--host 127.0.0.1" in hint
    assert ui_command("http://h:5000").startswith("open http://h:5000")


def test_another_cwd_gets_nothing(store, tmp_path, monkeypatch):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)  # else sqlite:///<out>/mlflow.db
    (out / "report").mkdir(parents=True)
    (out / "report" / "index.html").write_text("<p>report</p>")
    (out / "summary.json").write_text("{}")
    t = Tracker(default_uri(out), "cwd", out)
    t.log_metrics({"loss": 1.0}, 1)
    t.log_artifact(out / "summary.json")
    t.log_artifact(out / "report")
    t.finish()
    assert list(cwd.iterdir()) == []
    stored = MlflowClient(store.uri).get_run(t.run_id).info.artifact_uri
    assert stored.removeprefix("file://").startswith(str(store.dir / "mlartifacts"))
    files = sorted(
        p.relative_to(store.dir).parts[-2:]
        for p in (store.dir / "mlartifacts").rglob(f"{t.run_id}/**/*.*")
    )
    assert files == [("artifacts", "summary.json"), ("report", "index.html")]
    # the config key wins for a new experiment
    t = Tracker(default_uri(out), "cwd2", out, artifact_location=str(tmp_path / "elsewhere"))
    t.log_artifact(out / "summary.json")
    t.finish()
    assert len(list((tmp_path / "elsewhere").rglob("summary.json"))) == 1
    assert list(cwd.iterdir()) == []


# --- resume, refused records, the buffer --------------------------------------------------------
def test_resume_logs_each_point_once_and_unknown_run_starts_anew(store, tmp_path, caplog):
    uri = store.uri
    first = Tracker(uri, "exp", tmp_path)
    first.log_params({"optim": {"lr": 1e-4}})
    for step in range(1, 5):
        first.log_metrics({"loss": float(step)}, step)  # killed after step 4, checkpoint at 2
    first.drain()
    resumed = Tracker(uri, "exp", tmp_path, run_id=first.run_id)
    resumed.log_params({"optim": {"lr": 1e-4}, "train": {"max_steps": 6}})
    for step in range(3, 7):
        resumed.log_metrics({"loss": 10.0 * step}, step)
    resumed.finish()
    assert _history(uri, first.run_id) == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
        (6, 60.0),
    ]
    assert resumed.skipped_points == 2
    assert MlflowClient(uri).get_run(first.run_id).data.params == {
        "optim.lr": "0.0001",
        "train.max_steps": "6",
    }
    with caplog.at_level(logging.WARNING, "train.tracking"):
        other = Tracker(uri, "exp", tmp_path, run_id="0" * 32)  # e.g. another tracking uri
    assert other.run_id not in (None, "0" * 32) and _messages(caplog, "starting a new run")


def test_refused_item_is_reported_once_and_the_rest_flows(store, tmp_path, caplog):
    uri = store.uri
    t = Tracker(uri, "exp", tmp_path)
    with caplog.at_level(logging.WARNING, "train.tracking"):
        for step in (1, 2):
            t.log_metrics({"loss": float(step), "bad%name": 1.0}, step)  # MLflow refuses the name
    t.finish()
    assert _history(uri, t.run_id) == [(1, 1.0), (2, 2.0)]
    assert t.refused == {"bad%name": 2} and not t.buffer.exists()
    assert len(_messages(caplog, "refused metric 'bad%name'")) == 1
    assert not _messages(caplog, "did not answer")
    assert MlflowClient(uri).get_run(t.run_id).info.status == "FINISHED"


def test_truncated_buffer_line_is_skipped_and_later_appends_survive(store, tmp_path, caplog):
    out = tmp_path / "out"
    away = Tracker(f"http://127.0.0.1:{free_port()}", "exp", out)  # nothing listens there
    away.log_metrics({"loss": 3.0}, 1)
    away.drain()
    with away.buffer.open("a") as f:
        f.write('{"metrics": [["loss", 2.5, 17')  # the process was killed mid-append
    assert away.flush_buffer() == 0  # the failed replay rewrote the buffer without it
    away.log_metrics({"loss": 2.0}, 2)
    lines = away.buffer.read_text().splitlines()
    assert away.bad_lines == 1 and [json.loads(line)["metrics"][0][3] for line in lines] == [1, 2]
    with away.buffer.open("a") as f:
        f.write('{"tags": [["a", "b"')  # killed mid-append again, now the last line
    uri = store.uri
    with caplog.at_level(logging.WARNING, "train.tracking"):
        back = Tracker(uri, "exp", out)  # same run directory, the store answers
        back.log_metrics({"loss": 1.0}, 3)
    back.finish()
    assert _history(uri, back.run_id) == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert back.bad_lines == 1 and not back.buffer.exists()
    assert _messages(caplog, "skipped 1 unreadable line(s)") and _messages(caplog, "lines 2")
    assert MlflowClient(uri).get_run(back.run_id).info.status == "FINISHED"


def test_store_away_at_start_buffers_then_creates_the_run_late(store, tmp_path, caplog):
    blocker = tmp_path / "mnt"
    blocker.write_text("")  # the store's directory cannot be made: e.g. a share not mounted yet
    uri = f"sqlite:///{blocker}/mlflow.db"
    with caplog.at_level(logging.WARNING, "train.tracking"):
        t = Tracker(uri, "late", tmp_path / "out")
        t.log_metrics({"loss": 3.0}, 1)
        t.log_metrics({"loss": 2.0}, 2)
        t.drain()
        assert t.run_id is None and len(t.buffer.read_text().splitlines()) == 2
        blocker.unlink()
        blocker.symlink_to(store.dir)  # mounted: the store answers
        t.log_metrics({"loss": 1.0}, 3)  # buffered records go first
        t.finish()
    assert not t.buffer.exists() and _history(uri, t.run_id) == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert len(_messages(caplog, "did not answer")) == 1 and _messages(caplog, "answers again")
    assert MlflowClient(uri).get_run(t.run_id).info.status == "FINISHED"


# --- the sender thread: the training thread never waits ------------------------------------------
def _in_thread(fn, timeout=30.0) -> None:
    """Run `fn` in a thread; fail if it has not returned after `timeout` (it waited on MLflow)."""
    import threading

    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the training thread waited on the tracking server"


def test_a_server_that_accepts_and_never_answers_costs_the_training_thread_nothing(
    tmp_path, monkeypatch
):
    import threading

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    connections, stop = [], threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(128)
        server.settimeout(0.1)

        def accept():  # every connection accepted and held, never answered
            while not stop.is_set():
                try:
                    connections.append(server.accept()[0])
                except TimeoutError:
                    pass
                except OSError:  # the socket closed at the test's end
                    return

        threading.Thread(target=accept, daemon=True).start()
        t = Tracker(f"http://127.0.0.1:{server.getsockname()[1]}", "exp", tmp_path / "out")
        at_start = len(connections)  # the start-up's one attempt (its timeout, once)
        # 200 log lines at 2 s each would be 400 s; handed to the sender they are nothing
        _in_thread(lambda: [t.log_metrics({"loss": 1.0 / i}, i) for i in range(1, 201)])
        t.drain()
        steps = [json.loads(line)["metrics"][0][3] for line in t.buffer.read_text().splitlines()]
        assert steps == list(range(1, 201))  # all kept, in order, for when it answers
        assert len(connections) - at_start <= 2  # one attempt per RETRY_S, not one per record
        stop.set()
        time.sleep(0.2)  # the accept loop sees it before the socket closes
        for conn in connections:
            conn.close()


def test_spill_puts_what_is_queued_on_disk_before_a_checkpoint(store, tmp_path, monkeypatch):
    """The sender is stuck on a record; the checkpoint's spill writes the queue to the buffer;
    the job is killed; the resumed job's tracker sends all of it."""
    import threading

    from train import tracking

    out, release = tmp_path / "out", threading.Event()
    t = Tracker(store.uri, "spill", out)
    deliver = tracking.Tracker._deliver
    monkeypatch.setattr(
        tracking.Tracker, "_deliver", lambda self, r: release.wait() or deliver(self, r)
    )
    _in_thread(lambda: [t.log_metrics({"loss": float(i)}, i) for i in range(1, 6)])
    t.spill()
    steps = sorted(json.loads(x)["metrics"][0][3] for x in t.buffer.read_text().splitlines())
    assert steps == [1, 2, 3, 4, 5]  # on disk, though the server has none of them yet
    # killed here: the sender's record is also in the file (appended before it was sent)
    monkeypatch.setattr(tracking.Tracker, "_deliver", deliver)
    resumed = Tracker(store.uri, "spill", out, run_id=t.run_id)
    resumed.finish()
    assert _history(store.uri, t.run_id) == [(i, float(i)) for i in range(1, 6)]
    release.set()


def test_spill_waits_for_the_record_the_sender_has_taken(store, tmp_path, monkeypatch):
    """A sender slow between taking a record off the queue and writing it to the buffer (a
    busy disk): `spill` still leaves every record on disk (it once read the queue in that gap,
    and the taken record was on neither)."""
    import threading

    from train import tracking

    out, release = tmp_path / "out", threading.Event()
    t = Tracker(store.uri, "gap", out)
    append, deliver = tracking.Tracker._append, tracking.Tracker._deliver

    def slow_append(self, record):
        if threading.current_thread().name == "mlflow-sender":
            time.sleep(0.5)
        append(self, record)

    monkeypatch.setattr(tracking.Tracker, "_append", slow_append)
    monkeypatch.setattr(
        tracking.Tracker, "_deliver", lambda self, r: release.wait() or deliver(self, r)
    )
    for i in range(1, 4):
        t.log_metrics({"loss": float(i)}, i)
    time.sleep(0.1)  # the sender has taken step 1 and is writing it
    t.spill()
    steps = sorted(json.loads(x)["metrics"][0][3] for x in t.buffer.read_text().splitlines())
    assert steps == [1, 2, 3]
    release.set()


# --- a real server, started the way the printed hint says ----------------------------------------
def _wait_port(port, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"mlflow server did not open port {port}")


def _start(cmd, port, cwd):
    argv = [sys.executable, "-m", *shlex.split(cmd)]  # "mlflow ui ..." -> python -m mlflow ui ...
    argv[argv.index("--port") + 1] = str(port)
    return subprocess.Popen(
        argv + ["--workers", "1"], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def ui(store):
    """A finished training run in <out>/mlflow.db, then `mlflow ui` on it as the hint says."""
    root, out, uri = store.root, store.dir, store.uri
    cwd = root / "cwd"
    (out / "report").mkdir(parents=True)
    cwd.mkdir()
    Image.new("RGB", (64, 32), (200, 40, 40)).save(out / "report" / "retrievals.png")
    (out / "report" / "index.html").write_text('<img src="retrievals.png">')
    Image.new("RGB", (48, 48), (40, 40, 200)).save(out / "learning_curves.png")
    (out / "results.json").write_text(json.dumps({"R@1": 61.0}))
    t = Tracker(uri, "covr-train", out, run_name="demo")
    t.log_params({"optim": {"lr": 2e-3}})
    t.log_metrics({"loss": 1.0, "R@1": 61.0}, 10)
    for path in sorted((out / "report").iterdir()):
        t.log_artifact(path, "report")
    t.log_artifact(out / "learning_curves.png")
    t.log_artifact(out / "results.json")
    t.finish()
    port = free_port()
    server = _start(ui_command(uri), port, cwd)
    try:
        _wait_port(port)
        yield SimpleNamespace(
            http=f"http://127.0.0.1:{port}",
            sqlite=uri,
            run_id=t.run_id,
            out=out,
            cwd=cwd,
            root=root,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.e2e
def test_ui_lists_and_serves_the_artifacts(ui):
    files = {}
    for path in ("", "report"):
        r = requests.get(
            f"{ui.http}/ajax-api/2.0/mlflow/artifacts/list",
            params={"run_id": ui.run_id, "path": path},
            timeout=30,
        )
        r.raise_for_status()
        files.update({f["path"]: f for f in r.json()["files"]})
    assert {
        "report",
        "report/retrievals.png",
        "report/index.html",
        "learning_curves.png",
        "results.json",
    } <= set(files)
    for name in ("report/retrievals.png", "learning_curves.png", "results.json"):
        r = requests.get(
            f"{ui.http}/get-artifact", params={"path": name, "run_uuid": ui.run_id}, timeout=30
        )
        r.raise_for_status()
        assert r.content == (ui.out / name).read_bytes(), name
    assert list((ui.out / "mlartifacts").rglob("retrievals.png"))  # beside the store
    assert not (ui.root / "mlruns").exists() and not list(ui.cwd.iterdir())


@pytest.mark.e2e
def test_server_refusals_on_resume_do_not_block(ui, tmp_path, caplog):
    out = tmp_path / "trial"
    first = Tracker(ui.http, "resume", out)
    first.log_params({"optim": {"lr": 1e-4}, "seed": 1})
    first.log_metrics({"loss": 3.0}, 1)  # then killed: no finish
    first.drain()  # (it reached the server before the kill)
    with caplog.at_level(logging.WARNING, "train.tracking"):
        resumed = Tracker(ui.http, "resume", out, run_id=first.run_id)
        resumed.log_params(
            {"optim": {"lr": 2e-3}, "seed": 1, "extra": "x"}
        )  # compared, not re-sent
        resumed.log_metrics({"loss": 9.0}, 1)  # recomputed after the resume: already there
        resumed.log_metrics({"loss": 2.0}, 2)
        resumed.drain()
        # what an outage before a kill leaves: a params record the server will refuse, a metric
        out.mkdir(parents=True, exist_ok=True)
        with resumed.buffer.open("a") as f:
            f.write(json.dumps({"params": [["optim.lr", "5e-3"], ["late", "y"]]}) + "\n")
            f.write(json.dumps({"metrics": [["loss", 1.0, int(time.time() * 1000), 3]]}) + "\n")
        resumed.log_metrics({"loss": 0.5}, 4)
        resumed.finish()
    run = MlflowClient(ui.http).get_run(first.run_id)
    assert run.info.status == "FINISHED" and not resumed.buffer.exists()
    assert run.data.params == {"optim.lr": "0.0001", "seed": "1", "extra": "x", "late": "y"}
    assert _history(ui.http, first.run_id) == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    assert len(_messages(caplog, "param optim.lr of resumed run")) == 1
    assert len(_messages(caplog, "refused param 'optim.lr'")) == 1 and resumed.refused == {
        "optim.lr": 1
    }
    assert not _messages(caplog, "did not answer")
