"""Writing shards: a `ShardJob` (a name and its records) becomes one tar, written atomically, and
jobs run on local processes or as Ray tasks.

Shard i is written as PREFIX-00000i.tar.tmp, renamed when complete, then PREFIX-00000i.stats.json
is written last: the completion marker. A rerun keeps shards with a stats file whose inputs are
unchanged (the size and mtime of every media file its records name, taken before reading them),
so a killed run resumes and ends with the same shard set, and a shard whose videos were fixed,
added or replaced since is packed again. Tars are byte-reproducible (fixed mtime, fixed order).

Every media path must lie inside the media root (`data.paths`); one that does not is refused
like an unreadable file: skipped, counted and named in the stats.

Local workers die with the packing process (a parent-death signal and a watchdog thread), so a
killed pack leaves nothing running.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from webdataset import TarWriter

from configs.schema import ShardConfig
from data.paths import UnsafePathError, check_inside
from data.video import VideoDecodeError, load_frames
from data.webvid_covr import video_path
from sharding import format as fmt

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ShardJob:
    index: int
    name: str
    records: list[dict]  # sharding.records
    media_root: str
    out_dir: str
    cfg: ShardConfig
    fingerprint: str


@dataclass
class ShardStats:
    name: str
    samples: int = 0
    triplets: int = 0
    bytes: int = 0
    sha256: str = ""
    seconds: float = 0.0
    # {"key", "video", "reason"} plus "row" (one triplet lost) or "rows" (the whole record lost)
    skipped: list[dict] = field(default_factory=list)
    skipped_records: int = 0  # records not packed (target unreadable, or no triplet left)
    skipped_triplets: int = 0  # triplets not packed (those of skipped records included)
    fingerprint: str = ""  # annotations + settings: must match for the shard to be kept
    inputs: str = ""  # the records' media files (path, size, mtime): changed -> packed again


NO_QUERY_LEFT = "no query left"  # a record lost because each of its queries was


def load_media(path: Path, n: int) -> np.ndarray:
    """(N, H, W, 3) uint8: `n` frames of a video, or an image as a single frame."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            return fmt.decode_rgb(path)[None]
        except fmt.ImageDecodeError as err:
            raise VideoDecodeError(path, str(err)) from None
    return load_frames(path, n=n)


def media_path(root: Path, name: str, explicit: str | None) -> Path:
    """A record's media file: `explicit` (images named by a benchmark's split file) or the video
    `<root>/<name>.mp4`; `UnsafePathError` when it would lie outside `root`."""
    return check_inside(root, explicit) if explicit else video_path(root, name)


def media_files(record: dict, root: Path):
    """(name, path or the `UnsafePathError`) of the record's target, then of each query."""
    named = [(record["target"], record.get("target_file"))]
    named += [(t["pth1"], t.get("query_file")) for t in record["triplets"]]
    for name, explicit in named:
        try:
            yield name, media_path(root, name, explicit)
        except UnsafePathError as err:
            yield name, err


def inputs_signature(job: ShardJob) -> str:
    """A hash of the size and mtime of every media file the job's records name."""
    h = hashlib.sha256()
    for record in job.records:
        for name, path in media_files(record, Path(job.media_root)):
            if isinstance(path, UnsafePathError):
                h.update(f"{name}:refused\n".encode())
                continue
            try:
                st = path.stat()
                h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{path}:missing\n".encode())
    return h.hexdigest()[:16]


def pack_record(record: dict, job: ShardJob, stats: ShardStats) -> dict | None:
    """The record's sample, its media decoded and re-encoded; a triplet whose query cannot be
    read (or lies outside the media root) is dropped, a record whose target cannot be read (or
    with no triplet left) too, each listed in `stats.skipped` with its reason and counted."""
    root, cfg = Path(job.media_root), job.cfg
    rows = [t["row"] for t in record["triplets"]]
    try:
        path = media_path(root, record["target"], record.get("target_file"))
        target = load_media(path, cfg.target_frames)
        if cfg.target_channels == "bgr":  # the reference's OpenCV-read targets (ShardConfig)
            target = target[..., ::-1]
    except (VideoDecodeError, UnsafePathError) as err:
        stats.skipped.append(
            {"key": record["key"], "video": record["target"], "reason": str(err), "rows": rows}
        )
        stats.skipped_records += 1
        stats.skipped_triplets += len(rows)
        return None
    kept, queries = [], []
    for trip in record["triplets"]:
        try:
            path = media_path(root, trip["pth1"], trip.get("query_file"))
            queries.append(load_media(path, cfg.query_frames))
        except (VideoDecodeError, UnsafePathError) as err:
            stats.skipped.append(
                {
                    "key": record["key"],
                    "row": trip["row"],
                    "video": trip["pth1"],
                    "reason": str(err),
                }
            )
            stats.skipped_triplets += 1
            continue
        kept.append({k: v for k, v in trip.items() if k != "query_file"})
    if not kept:  # its target is lost with it (its queries are listed above)
        stats.skipped.append(
            {"key": record["key"], "video": record["target"], "reason": NO_QUERY_LEFT, "rows": []}
        )
        stats.skipped_records += 1
        return None
    meta = {"target": record["target"], "target_id": record["target_id"], "triplets": kept}
    return fmt.encode_record(
        record["key"], meta, target, queries, cfg.frame_size, cfg.jpeg_quality, cfg.frame_format
    )


def pack_shard(job: ShardJob) -> ShardStats:
    """Write one shard atomically and its stats file last. Safe to call again after a crash."""
    start = time.perf_counter()
    # the inputs as they are before reading them: a file changed while packing is seen next time
    stats = ShardStats(name=job.name, fingerprint=job.fingerprint, inputs=inputs_signature(job))
    samples = (pack_record(record, job, stats) for record in job.records)
    kept = (s for s in samples if s is not None)
    return write_shard(job.out_dir, job.name, kept, stats, start)


def shard_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """A shard's tar and its stats file (the completion marker)."""
    return Path(out_dir) / f"{name}.tar", Path(out_dir) / f"{name}.stats.json"


def write_shard(
    out_dir: str | Path, name: str, samples: Iterable[dict], stats: ShardStats, start: float
) -> ShardStats:
    """`samples` into `out_dir/NAME.tar` under a temporary name, renamed when complete; counted
    into `stats`, whose file `NAME.stats.json` is written last: its presence marks the shard
    done (`finished`). The one shard writer, for packing and for embedding."""
    final, stats_path = shard_paths(out_dir, name)
    tmp = final.with_name(final.name + ".tmp")
    with tmp.open("wb") as f:
        writer = TarWriter(f, encoder=False, mtime=0.0)
        for sample in samples:
            writer.write(sample)
            stats.samples += 1
            stats.triplets += len(fmt.record_meta(sample)["triplets"])
        writer.close()
    data = tmp.read_bytes()
    stats.bytes, stats.sha256 = len(data), hashlib.sha256(data).hexdigest()
    tmp.replace(final)
    stats.seconds = round(time.perf_counter() - start, 3)
    stats_tmp = stats_path.with_suffix(".tmp")
    stats_tmp.write_text(json.dumps(asdict(stats), indent=1))
    stats_tmp.replace(stats_path)
    return stats


class ShardMismatch(ValueError):
    """A finished shard in the output directory was written from other inputs or settings."""


def finished(
    out_dir: str | Path, name: str, fingerprint: str, inputs: str | None = None
) -> ShardStats | None:
    """The stats of shard `name` an earlier run completed in `out_dir` (its stats file, written
    last, is there), else None; with `inputs`, one whose media files changed since is None too
    (done again). A shard with another fingerprint is an error: a directory never mixes shards
    packed or embedded from different sources or settings."""
    final, path = shard_paths(out_dir, name)
    if not path.is_file() or not final.is_file():
        return None
    stats = ShardStats(**json.loads(path.read_text()))
    if stats.fingerprint != fingerprint:
        raise ShardMismatch(
            f"{path}: written from other inputs, settings or model (fingerprint "
            f"{stats.fingerprint}, now {fingerprint}); use a fresh output directory"
        )
    if inputs is not None and stats.inputs != inputs:
        log.info("%s: its media files changed since it was packed; packing it again", name)
        return None
    return stats


def finished_job(job: ShardJob) -> ShardStats | None:
    return finished(job.out_dir, job.name, job.fingerprint, inputs_signature(job))


# --- running jobs ------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this process when the packing process dies, even by SIGKILL
    (which runs no cleanup): the kernel's parent-death signal on Linux, and a watchdog thread
    that sees the parent change (also where prctl is missing)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def run_local(jobs: list[ShardJob], workers: int) -> Iterable[ShardStats]:
    if workers <= 1:
        yield from map(pack_shard, jobs)
        return
    with ProcessPoolExecutor(
        workers, initializer=_die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        yield from pool.map(pack_shard, jobs)


def run_ray(jobs: list[ShardJob], address: str | None, workers: int) -> Iterable[ShardStats]:
    import ray

    if not ray.is_initialized():
        from sharding.local_ray import ray_init  # local Ray: 127.0.0.1 only

        ray_init(address, num_cpus=None if address else max(workers, 1), log_to_driver=False)
    remote = ray.remote(num_cpus=1)(pack_shard)
    pending = [remote.remote(job) for job in jobs]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
