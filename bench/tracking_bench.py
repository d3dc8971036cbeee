"""Training never waits on MLflow: the step rate of a stand-in step loop (a matmul per step, a
log line every 10 steps, as `train.loop` logs) with no tracking, with a tracking server that
accepts connections and never answers, and with one that answers every request after a delay (a
real `mlflow server` behind a slow proxy). Each is also run waiting for every record to be sent
(`drain` after each log line): what the synchronous tracker of before cost.

  python bench/tracking_bench.py [--steps 600] [--delay-s 1.0] [--out runs/tracking_bench.json]

Ratios are measured side by side in one run (2 cores: noisy in absolute terms)."""

import argparse
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hung_server() -> tuple[str, socket.socket]:
    """Listens (the kernel completes every connection) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1024)
    return f"http://127.0.0.1:{server.getsockname()[1]}", server


def slow_proxy(target: str, delay_s: float) -> str:
    """Forwards every request to `target` after `delay_s`."""
    import requests

    class Handler(http.server.BaseHTTPRequestHandler):
        def _forward(self):
            time.sleep(delay_s)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            r = requests.request(
                self.command,
                target + self.path,
                data=body,
                headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                timeout=30,
            )
            self.send_response(r.status_code)
            for k, v in r.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def mlflow_server(root: Path) -> tuple[str, subprocess.Popen]:
    import requests

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--workers", "1"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(uri + "/health", timeout=2).ok:
                return uri, proc
        except requests.RequestException:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def step_loop(steps: int, tracker, wait: bool) -> float:
    """Steps per second of a matmul per step, a log line every 10 steps."""
    import torch

    x = torch.randn(512, 512)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        y = x @ x
        if step % 10 == 0 and tracker is not None:
            tracker.log_metrics({"loss": float(y[0, 0]), "lr": 1e-4}, step)
            if wait:
                tracker.drain()
    return steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--delay-s", type=float, default=1.0)
    p.add_argument("--out", default="runs/tracking_bench.json")
    args = p.parse_args(argv)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"  # the tracker's own default
    import torch

    torch.set_num_threads(1)
    from train.tracking import Tracker

    root = Path(tempfile.mkdtemp(prefix="tracking_bench_"))
    hung_uri, hung = hung_server()
    real_uri, real = mlflow_server(root)
    slow_uri = slow_proxy(real_uri, args.delay_s)
    results = {"steps": args.steps, "log_every": 10, "delay_s": args.delay_s}
    try:
        step_loop(200, None, False)  # warm-up
        for name, uri in (("hung", hung_uri), ("slow", slow_uri)):
            for wait in (False, True):
                # waiting costs seconds per log line: a few lines tell it
                steps = 50 if wait else args.steps
                t = Tracker(uri, f"bench-{name}", root / f"{name}-{wait}")
                base = step_loop(steps, None, False)  # beside it, on the same warm machine
                rate = step_loop(steps, t, wait)
                after = step_loop(steps, None, False)
                base = (base + after) / 2
                key = f"{name}_{'waiting_per_record' if wait else 'background_sender'}"
                results[key] = {
                    "steps_per_s": round(rate, 1),
                    "no_tracking_steps_per_s": round(base, 1),
                    "ratio": round(rate / base, 3),
                }
                print(key, results[key], flush=True)
                t.spill()  # not `finish`: closing waits on the server, outside the step loop
    finally:
        real.terminate()
        hung.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
