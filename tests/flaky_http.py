"""A real HTTP file server on 127.0.0.1 that misbehaves on purpose: it answers Range requests
like a web server or object store, and a seeded share of its answers are errors (503) or bodies
cut off mid-way (the connection closed after part of what the headers promised)."""

from __future__ import annotations

import random
import threading
from collections import Counter
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Faults:
    """`error`, `drop`: the seeded share of answers that fail; `fail_first`: the first requests
    of each path (GET or HEAD) that fail, whatever the draw."""

    def __init__(
        self,
        error: float = 0.0,
        drop: float = 0.0,
        seed: int = 0,
        status: int = 503,
        fail_first: int = 0,
    ):
        self.error, self.drop, self.status, self.fail_first = error, drop, status, fail_first
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.requests: Counter = Counter()  # path -> GET requests ("HEAD path" -> HEADs)
        self.injected: Counter = Counter()  # "error" / "drop" -> times

    def draw(self, path: str, method: str = "GET") -> str | None:
        with self.lock:
            self.requests[path if method == "GET" else f"{method} {path}"] += 1
            seen = self.requests[path] + self.requests[f"HEAD {path}"]
            r = -1.0 if seen <= self.fail_first else self.rng.random()
            kind = "error" if r < self.error else "drop" if r < self.error + self.drop else None
            if kind:
                self.injected[kind] += 1
            return kind


def _handler(root: Path, faults: Faults):
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):  # quiet test output
            pass

        def do_GET(self):
            path = Path(self.translate_path(self.path))
            if path.is_dir():
                return super().do_GET()  # an index page, as many servers give
            kind = faults.draw(self.path)
            if kind == "error":
                self.send_error(faults.status, "injected")
                return
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start, end = 0, len(data)
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes="):
                lo, _, hi = ranged[6:].partition("-")
                start, end = int(lo or 0), min(len(data), int(hi) + 1 if hi else len(data))
            body = data[start:end]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if kind == "drop":  # promise the whole body, send part of it, hang up
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_HEAD(self):
            path = Path(self.translate_path(self.path))
            if not path.is_file():
                return super().do_HEAD()
            if faults.draw(self.path, "HEAD") == "error":
                self.send_error(faults.status, "injected")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

    return Handler


@contextmanager
def serve(root: Path, faults: Faults | None = None):
    """Yields (base URL, faults) while a threaded server serves `root`."""
    faults = faults or Faults()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), faults))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
