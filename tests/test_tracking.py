import socket
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from tests.multirank import free_port
from train.tracking import Tracker, flatten, metric_name


def test_names_and_flattening():
    assert metric_name("R@1") == "recall_at_1" and metric_name("val/R@10") == "val/recall_at_10"
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_sqlite_store_round_trip(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
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


def _wait_port(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"mlflow server did not open port {port}")


def _server(tmp_path, port):
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--default-artifact-root", str(tmp_path / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.e2e
def test_real_server_outage_buffers_and_resends(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    t = Tracker(uri, "exp", tmp_path / "out")  # server not started yet: nothing reachable
    assert t.run_id is None
    t.log_metrics({"loss": 3.0}, 1)
    t.log_metrics({"loss": 2.0}, 2)
    assert (tmp_path / "out" / "mlflow_buffer.jsonl").is_file()
    server = _server(tmp_path, port)
    try:
        _wait_port(port)
        t.log_metrics({"loss": 1.0}, 3)  # reaches the server: buffered records go first
        assert not (tmp_path / "out" / "mlflow_buffer.jsonl").exists()
        t.finish()
        history = MlflowClient(uri).get_metric_history(t.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    finally:
        server.terminate()
        server.wait(timeout=30)
