"""Writing shards: a `ShardJob` (a name and its records) becomes one tar, written atomically, and
jobs run on local processes or as Ray tasks.

Shard i is written as PREFIX-00000i.tar.tmp, renamed when complete, then PREFIX-00000i.stats.json
is written last: the completion marker. A rerun skips shards with a stats file, so a killed run
resumes and ends with the same shard set. Tars are byte-reproducible (fixed mtime, fixed order).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from webdataset import TarWriter

from configs.schema import ShardConfig
from data.video import VideoDecodeError, load_frames
from data.webvid_covr import video_path
from sharding import format as fmt

# frames (Ft, H, W, 3) uint8 -> (Ft, Q, D) float16 target embeddings (a frozen target encoder)
Embed = Callable[[np.ndarray], np.ndarray]
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
    embed: Embed | None = None  # set: pack target embeddings instead of target JPEGs


@dataclass
class ShardStats:
    name: str
    samples: int = 0
    triplets: int = 0
    bytes: int = 0
    sha256: str = ""
    seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)  # {"key", "video", "reason"}
    fingerprint: str = ""


def load_media(path: Path, n: int) -> np.ndarray:
    """(N, H, W, 3) uint8: `n` frames of a video, or an image as a single frame."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            return fmt.decode_rgb(path)[None]
        except fmt.ImageDecodeError as err:
            raise VideoDecodeError(path, str(err)) from None
    return load_frames(path, n=n)


def _media_path(root: Path, name: str, explicit: str | None) -> Path:
    return Path(explicit) if explicit else video_path(root, name)


def encode_record(record: dict, job: ShardJob, skipped: list[dict]) -> dict | None:
    """The record's sample, its media decoded and re-encoded; a triplet whose query cannot be
    read is dropped, a record whose target cannot be read (or with no triplet left) too, each
    listed in `skipped` with its reason."""
    root, cfg = Path(job.media_root), job.cfg
    try:
        target = load_media(
            _media_path(root, record["target"], record.get("target_file")), cfg.target_frames
        )
    except VideoDecodeError as err:
        skipped.append({"key": record["key"], "video": record["target"], "reason": str(err)})
        return None
    kept, queries = [], []
    for trip in record["triplets"]:
        try:
            path = _media_path(root, trip["pth1"], trip.get("query_file"))
            queries.append(load_media(path, cfg.query_frames))
        except VideoDecodeError as err:
            skipped.append({"key": record["key"], "row": trip["row"], "video": trip["pth1"],
                            "reason": str(err)})  # fmt: skip
            continue
        kept.append({k: v for k, v in trip.items() if k != "query_file"})
    if not kept:
        return None
    if job.embed is not None:
        target = job.embed(target)
    meta = {"target": record["target"], "target_id": record["target_id"], "triplets": kept}
    return fmt.encode_record(record["key"], meta, target, queries, cfg.frame_size,
                             cfg.jpeg_quality, embedded=job.embed is not None)  # fmt: skip


def _paths(job: ShardJob) -> tuple[Path, Path, Path]:
    out = Path(job.out_dir)
    return out / f"{job.name}.tar", out / f"{job.name}.tar.tmp", out / f"{job.name}.stats.json"


def pack_shard(job: ShardJob) -> ShardStats:
    """Write one shard atomically and its stats file last. Safe to call again after a crash."""
    start = time.perf_counter()
    final, tmp, stats_path = _paths(job)
    stats = ShardStats(name=job.name, fingerprint=job.fingerprint)
    with tmp.open("wb") as f:
        writer = TarWriter(f, encoder=False, mtime=0.0)
        for record in job.records:
            sample = encode_record(record, job, stats.skipped)
            if sample is not None:
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


def finished(job: ShardJob) -> ShardStats | None:
    """The stats of a shard an earlier run completed, else None."""
    final, _, path = _paths(job)
    if not path.is_file() or not final.is_file():
        return None
    stats = ShardStats(**json.loads(path.read_text()))
    if stats.fingerprint != job.fingerprint:
        raise RuntimeError(
            f"{path}: written from other annotations or settings (fingerprint {stats.fingerprint}, "
            f"now {job.fingerprint}); use a fresh output directory"
        )
    return stats


def run_local(jobs: list[ShardJob], workers: int) -> Iterable[ShardStats]:
    if workers <= 1:
        yield from map(pack_shard, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
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
