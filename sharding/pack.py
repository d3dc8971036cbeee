"""Packing: records (sharding.records) are shuffled by seed, cut into shards, written by
`sharding.writer` (local processes or Ray tasks; resumable) and described by `manifest.json`.

Train and val splits skip and count what cannot be packed (a missing, unreadable or refused
video). A test split keeps every query: one such video is a `MissingVideosError` listing them
all, before packing for missing and refused files, after it for undecodable ones, and no
manifest is written, unless `subset=True` says to pack what exists (WebVid's hosting has lost
many test videos): then it skips and counts like the other splits and the manifest says
`"subset": true`. Every manifest records `source_counts` (records, triplets and distinct targets
in the annotations), from which evaluation reports its coverage."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path

from tqdm import tqdm

from configs.schema import ShardConfig, marked
from data.paths import UnsafePathError
from data.webvid_covr import MissingVideosError, read_annotations, split_of
from sharding.manifest import MANIFEST, packed_manifest, write_manifest
from sharding.records import build_records, cirr_records, image_records
from sharding.writer import (
    NO_QUERY_LEFT,
    ShardJob,
    finished_job,
    media_files,
    run_local,
    run_ray,
)

log = logging.getLogger(__name__)


# bumped when the frame choice changes (v2: the reference's linspace rule, no repeated frames)
FRAME_RULE = "frames-v2"


def _fingerprint(source: bytes, cfg: ShardConfig) -> str:
    h = hashlib.sha256(source)
    h.update(FRAME_RULE.encode())
    for k in marked(ShardConfig, "packing"):  # the fields marked PACKING, in their order
        h.update(f"{k}={getattr(cfg, k)}".encode())
    return h.hexdigest()[:16]


def plan_jobs(
    records: list[dict], fp: str, media_root: str | Path, out_dir: str | Path, cfg: ShardConfig
) -> list[ShardJob]:
    """Records shuffled by seed and cut into shards: the same inputs give the same shards."""
    records = list(records)
    random.Random(cfg.seed).shuffle(records)
    n = cfg.samples_per_shard
    return [
        ShardJob(
            index=i,
            name=f"{cfg.prefix}-{i:06d}",
            records=records[start : start + n],
            media_root=str(media_root),
            out_dir=str(out_dir),
            cfg=cfg,
            fingerprint=fp,
        )
        for i, start in enumerate(range(0, len(records), n))
    ]


def pack(
    csv_path: str | Path,
    video_root: str | Path,
    out_dir: str | Path,
    cfg: ShardConfig,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = False,
    split: str | None = None,
    subset: bool = False,
    images: bool = False,
) -> dict:
    """Pack (or finish packing) a WebVid-CoVR CSV and its videos; returns the manifest. `split`
    (train / val / test) defaults to the one the file name says (`test.csv`,
    `webvid8m-covr_test.csv`); `subset`: a test split packs the videos that exist. `images`:
    the CSV names images (CC-CoIR on CC3M: `<root>/<pth>.jpg|png`), each packed as one frame."""
    csv_path = Path(csv_path)
    rows = read_annotations(csv_path)
    if images:
        records = image_records(rows, video_root, cfg.epoch)
    else:
        records = build_records(rows, cfg.epoch)
    fp = _fingerprint(csv_path.read_bytes(), cfg)
    split = split_of(csv_path) if split is None else split
    return pack_records(
        records,
        fp,
        csv_path,
        video_root,
        out_dir,
        cfg,
        backend,
        ray_address,
        progress,
        split,
        subset,
        len(rows),
    )


def pack_cirr(
    root: str | Path,
    split: str,
    out_dir: str | Path,
    cfg: ShardConfig,
    image_root: str | Path | None = None,
    backend: str = "local",
    progress: bool = False,
    subset: bool = False,
) -> dict:
    """Pack CIRR triplets (for fine-tuning) in the same record layout; returns the manifest."""
    records = cirr_records(root, split, image_root)
    fp = _fingerprint(json.dumps(records, sort_keys=True).encode(), cfg)
    source = Path(root) / "captions" / f"cap.rc2.{split}.json"
    media_root = image_root or Path(root) / "img_raw"
    return pack_records(
        records, fp, source, media_root, out_dir, cfg, backend, None, progress, split, subset
    )


def pack_records(
    records: list[dict],
    fp: str,
    source: str | Path,
    media_root: str | Path,
    out_dir: str | Path,
    cfg: ShardConfig,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = False,
    split: str = "",
    subset: bool = False,
    rows: int | None = None,
) -> dict:
    """Pack (or finish packing) records into shards and write the manifest. A `test` split loses
    nothing unless `subset` (module doc). `rows`: the annotation file's (duplicates counted)."""
    strict = split == "test" and not subset
    if subset and split == "test" and (absent := unusable_media(records, media_root)):
        log.warning(
            "%s: packing a subset: %d media file(s) missing or refused (listed in the "
            "manifest's skipped)",
            split,
            len(absent),
        )
    if strict and (absent := unusable_media(records, media_root)):
        raise MissingVideosError(split, absent)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = plan_jobs(records, fp, media_root, out, cfg)
    done = {job.name: s for job in jobs if (s := finished_job(job)) is not None}
    todo = [job for job in jobs if job.name not in done]
    log.info("%d shards planned, %d already complete", len(jobs), len(done))
    if todo:  # the old manifest no longer describes the directory
        (out / MANIFEST).unlink(missing_ok=True)
    runner = (
        run_ray(todo, ray_address, cfg.workers)
        if backend == "ray"
        else run_local(todo, cfg.workers)
    )
    for stats in tqdm(runner, total=len(todo), desc=f"pack {out.name}", disable=not progress):
        done[stats.name] = stats
    shards = [done[job.name] for job in jobs]
    reasons = {item["reason"] for s in shards for item in s.skipped} - {NO_QUERY_LEFT}
    if strict and (lost := sorted(reasons)):
        raise MissingVideosError(split, lost)
    manifest = packed_manifest(shards, source, media_root, cfg, fp if jobs else "", start, split)
    manifest["subset"] = subset and split == "test"
    manifest["source_counts"] = source_counts(records, rows)
    return write_manifest(out, manifest)


def source_counts(records: list[dict], rows: int | None = None) -> dict:
    """What the annotations hold, before anything was lost (evaluation's coverage totals);
    with the file's `rows`, how many of them were duplicates packed once."""
    triplets = sum(len(r["triplets"]) for r in records)
    return {
        **({"rows": rows, "duplicate_rows": rows - triplets} if rows is not None else {}),
        "records": len(records),
        "triplets": triplets,
        "targets": len({r["target"] for r in records}),
        "captions": sum(bool(t["txt2"]) for r in records for t in r["triplets"]),
    }


def unusable_media(records: list[dict], media_root: str | Path) -> list[str]:
    """Every media file the records name that is absent or outside the root, each with why."""
    found = set()
    for record in records:
        for _, path in media_files(record, Path(media_root)):
            if isinstance(path, UnsafePathError):
                found.add(str(path))
            elif not path.is_file():
                found.add(f"{path}: file not found")
    return sorted(found)


def pack_splits(
    corpus_root: str | Path,
    shard_root: str | Path,
    cfg: ShardConfig,
    splits=("train", "val", "test"),
    progress: bool = False,
    subset: bool = False,
) -> dict[str, dict]:
    """Pack `<corpus_root>/<split>.csv` (videos under `<corpus_root>/videos`) into
    `<shard_root>/<split>/`; shards already complete are kept (packing resumes)."""
    root = Path(corpus_root)
    return {
        split: pack(
            root / f"{split}.csv",
            root / "videos",
            Path(shard_root) / split,
            cfg,
            progress=progress,
            split=split,
            subset=subset,
        )
        for split in splits
    }
