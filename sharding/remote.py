"""Shards on a web server or an object store (any `scheme://` URL fsspec opens; `file://` and
plain paths are local).

- A shard is read in ranged chunks (`RemoteStream`), each chunk retried with doubling, jittered
  back-off when the error is transient (a dropped connection, a short body, a 5xx or 429, a
  timeout). A retried chunk starts at the byte the failed one did, so the bytes, and every
  record read from them, are those of an undisturbed read: exact resume holds over a flaky
  network. Errors that retrying cannot mend (404, 403) are not retried. When the attempts are
  spent the reader skips the shard and counts it, as for a local shard that cannot be opened.
- Small files (`manifest.json`, `groups.json`) are fetched whole, once per process, with the same
  retries.
- `ShardCache` (optional, `shards.cache_dir`): shards are downloaded whole into a local
  directory, kept only when their sha256 is the manifest's, and read from there next time
  (looked up by name and checksum, so a repacked shard is never served stale). The directory is
  held under `shards.cache_gb` by removing the least recently read shards; a cached file whose
  bytes stop matching is removed when the reader sees it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # one ranged request; a retry re-reads at most this much
MAX_WAIT_S = 60.0
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
STALE_PART_S = 3600.0  # a download left by a killed process


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(base: str | Path, *names: str) -> str | Path:
    """`base/names...`: a URL stays a string (a Path would fold `://` into `:/`)."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(str(base).removeprefix("file://")).joinpath(*names)


@dataclass(frozen=True)
class Fetch:
    """How remote files are read: `retries` attempts per request, the first wait `wait_s`
    (doubling up to a minute), and the optional local shard cache."""

    retries: int = 5
    wait_s: float = 1.0
    cache_dir: str = ""
    cache_bytes: int = 0

    @classmethod
    def from_config(cls, shards) -> Fetch:
        return cls(
            retries=shards.retries,
            wait_s=shards.retry_wait_s,
            cache_dir=shards.cache_dir,
            cache_bytes=int(shards.cache_gb * (1 << 30)),
        )


class RemoteReadError(OSError):
    """A remote read that failed on every attempt."""


class ShortRead(OSError):
    """A response with fewer bytes than asked for: the connection ended early."""


class SizeUnknown(OSError):
    """A size request that failed for a transient reason (fsspec reports every failed size
    request as `FileNotFoundError`; its cause says whether the file is really absent)."""


def transient(err: BaseException) -> bool:
    """Worth another attempt: network and server-side trouble, not a missing or forbidden file."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    status = getattr(err, "status", None) or getattr(err, "code", None)
    if isinstance(status, int) and 100 <= status < 600:
        return status in RETRY_STATUS or status >= 500
    if isinstance(err, (OSError, TimeoutError, EOFError)):
        return True
    try:
        import aiohttp  # fsspec's HTTP client: dropped bodies and refused connections
    except ImportError:
        return False
    return isinstance(err, aiohttp.ClientError)


def with_retries(what: str, attempt: Callable[[], bytes], fetch: Fetch):
    """`attempt()`, again after a back-off while its errors are transient; then
    `RemoteReadError` naming `what`, the attempts and the last error."""
    wait, jitter = fetch.wait_s, random.Random()  # jitter: ranks must not retry in lockstep
    for n in range(1, max(1, fetch.retries) + 1):
        try:
            return attempt()
        except Exception as err:
            if not transient(err):
                if isinstance(err, OSError):  # FileNotFoundError, PermissionError: callers' own
                    raise
                raise RemoteReadError(f"{what}: {err!r}") from err  # e.g. an HTTP 403
            if n >= fetch.retries:
                raise RemoteReadError(f"{what}: failed {n} times, last: {err!r}") from err
            pause = wait * (0.5 + jitter.random())
            log.info("%s: %r, attempt %d of %d in %.1f s", what, err, n + 1, fetch.retries, pause)
            time.sleep(pause)
            wait = min(2 * wait, MAX_WAIT_S)


def filesystem(url: str):
    """fsspec's file system for `url` and the path on it."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def fetch_bytes(url: str, fetch: Fetch | None = None) -> bytes:
    """A whole small file; `FileNotFoundError` when the server has none."""
    fs, path = filesystem(url)
    return with_retries(url, lambda: fs.cat_file(path), fetch or Fetch())


def read_bytes(location: str | Path, fetch: Fetch | None = None) -> bytes:
    """A whole file, local or remote (in retried ranged chunks): `FileNotFoundError` when
    absent, `RemoteReadError` when every attempt failed."""
    if is_remote(location):
        return RemoteStream(str(location), None, fetch or Fetch()).read()
    return Path(str(location).removeprefix("file://")).read_bytes()


def read_json(location: str | Path, fetch: Fetch | None = None):
    """A JSON file, local or remote: `FileNotFoundError` when absent, `ValueError` naming the
    file when it is not JSON, `RemoteReadError` when every attempt failed."""
    text = fetch_bytes(str(location), fetch) if is_remote(location) else read_bytes(location)
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{location}: not JSON ({err})") from None


def remote_size(url: str, fetch: Fetch | None = None) -> int:
    fs, path = filesystem(url)

    def attempt() -> int:
        try:
            return fs.size(path)
        except FileNotFoundError as err:
            if err.__cause__ is not None and transient(err.__cause__):
                raise SizeUnknown(f"size of {url}: {err.__cause__!r}") from err
            raise

    return int(with_retries(f"size of {url}", attempt, fetch or Fetch()))


def read_range(url: str, start: int, end: int, size: int, fetch: Fetch) -> bytes:
    """Bytes [start, end) of a file of `size` bytes, retried until they are all there."""
    fs, path = filesystem(url)

    def attempt() -> bytes:
        data = fs.cat_file(path, start=start, end=end)
        if len(data) == size and size != end - start:  # a server that ignores Range
            data = data[start:end]
        if len(data) != end - start:
            raise ShortRead(f"{len(data)} of {end - start} bytes")
        return data

    return with_retries(f"{url} bytes {start}-{end}", attempt, fetch)


class RemoteStream:
    """A remote file read front to back as a stream, chunk by chunk (see module doc)."""

    def __init__(self, url: str, size: int | None, fetch: Fetch):
        self.url, self.fetch = url, fetch
        self.size = size if size is not None else remote_size(url, fetch)
        self.pos, self.buf, self.at = 0, b"", 0  # next chunk's offset; chunk; read point in it

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n if n >= 0 else self.size
        while want > 0:
            if self.at >= len(self.buf):
                if self.pos >= self.size:
                    break
                end = min(self.pos + CHUNK_BYTES, self.size)
                self.buf, self.at = read_range(self.url, self.pos, end, self.size, self.fetch), 0
                self.pos = end
            piece = self.buf[self.at : self.at + want]
            self.at += len(piece)
            want -= len(piece)
            out.append(piece)
        return b"".join(out)

    def close(self) -> None:
        self.buf = b""


class ShardCache:
    """Remote shards kept on local disk, bounded in size (see module doc)."""

    def __init__(self, directory: str | Path, max_bytes: int):
        self.dir, self.max_bytes = Path(directory), max_bytes

    def path(self, url: str, sha256: str) -> Path:
        return self.dir / f"{sha256[:16]}-{url.rsplit('/', 1)[-1]}"

    def open(self, url: str, size: int, sha256: str, fetch: Fetch):
        """The shard's local copy, downloaded first when there is none; one that does not match
        the manifest is read once (the reader counts the mismatch) and not kept."""
        path = self.path(url, sha256)
        try:
            handle = open(path, "rb")
            if os.fstat(handle.fileno()).st_size == size:
                os.utime(path)  # least recently read goes first
                return handle
            handle.close()
        except FileNotFoundError:
            pass
        except OSError as err:  # the cache directory unreadable: the network still works
            return self._stream_instead(url, size, fetch, err)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            part = self.dir / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
            out = open(part, "wb")
        except OSError as err:
            return self._stream_instead(url, size, fetch, err)
        digest, stream = hashlib.sha256(), RemoteStream(url, size, fetch)
        try:
            with out:
                while chunk := stream.read(CHUNK_BYTES):
                    digest.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as err:  # a full disk: this shard is streamed, not cached
                        part.unlink(missing_ok=True)
                        return self._stream_instead(url, size, fetch, err)
            handle = open(part, "rb")  # opened before the rename: an eviction cannot race it
            if digest.hexdigest() == sha256:
                part.replace(path)
            else:
                part.unlink()  # read once from the open handle, never served from the cache
                return handle
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        self.evict(keep=path)
        return handle

    def _stream_instead(self, url: str, size: int, fetch: Fetch, err: OSError):
        log.warning("shard cache %s: %s; reading %s over the network", self.dir, err, url)
        return RemoteStream(url, size, fetch)

    def forget(self, url: str, sha256: str) -> None:
        """Drop a cached copy the reader found changed."""
        self.path(url, sha256).unlink(missing_ok=True)

    def evict(self, keep: Path | None = None) -> None:
        """Least recently read shards out until the cache fits; downloads a killed process left
        behind out as well."""
        entries = []
        for p in self.dir.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:  # another worker removed it
                continue
            if p.name.endswith(".part"):
                if time.time() - st.st_mtime > STALE_PART_S:
                    p.unlink(missing_ok=True)
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size


def forget_cached(url: str, sha256: str | None, fetch: Fetch | None) -> None:
    """Drop the cached copy of a remote shard that was found changed or damaged (if any)."""
    if sha256 and fetch is not None and fetch.cache_dir and is_remote(url):
        ShardCache(fetch.cache_dir, fetch.cache_bytes).forget(url, sha256)


def open_remote(url: str, size: int | None, sha256: str | None, fetch: Fetch):
    """A readable stream of the remote shard: from the cache when one is set (and the manifest's
    checksum and size are known, and the shard fits), else read over the network as it goes."""
    if fetch.cache_dir and sha256 and size is not None and size <= fetch.cache_bytes:
        return ShardCache(fetch.cache_dir, fetch.cache_bytes).open(url, size, sha256, fetch)
    return RemoteStream(url, size, fetch)
