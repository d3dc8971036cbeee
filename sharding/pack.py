"""Pack WebDataset-CoVR triplets into WebDataset tar shards.

Record layout (one `__key__`, one tar member per field; readable by any WebDataset reader):
  KEY.json          {"target", "target_id", "triplets": [{"row", "pth1", "txt1", "txt2", "edit",
                     "scores", "group"}, ...]}
  KEY.t00.jpg ...   target frames (centres of `target_frames` equal intervals)
  KEY.q000_0.jpg    query frame(s) of triplet 0 (`q{triplet}_{frame}`)
In `target` epoch mode a record holds every triplet of one target video (the reader draws one
per epoch, the reference recipe); in `triplet` mode one triplet per record.

Shard i is written as PREFIX-00000i.tar.tmp, renamed when complete, then PREFIX-00000i.stats.json
is written last: the completion marker. A rerun skips shards with a stats file, so a killed run
resumes and ends with the same shard set. Tars are byte-reproducible (fixed mtime, fixed order).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from configs.schema import ShardConfig
from data.video import VideoDecodeError, load_frames
from data.webvid_covr import Triplet, read_annotations, video_path

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def masked_caption_group(txt1: str, txt2: str) -> str:
    """The target caption with the word(s) that differ from the query caption masked: triplets
    of one-word variants of a caption share it (they are each other's hardest negatives)."""
    a, b = txt1.lower().split(), txt2.lower().split()
    if len(a) != len(b):
        return " ".join(b)
    return " ".join("_" if x != y else y for x, y in zip(a, b))


@dataclass
class ShardJob:
    index: int
    name: str
    records: list[dict]  # {"key", "target", "target_id", "triplets": [...]}
    video_root: str
    out_dir: str
    query_frames: int
    target_frames: int
    frame_size: int
    jpeg_quality: int
    fingerprint: str
    embed_model: str = ""


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


def build_records(rows: list[Triplet], epoch: str) -> list[dict]:
    """Deterministic records (sorted by key) from annotation rows."""
    target_ids = {p: i for i, p in enumerate(sorted({t.pth2 for t in rows}))}

    def triplet(row: int, t: Triplet) -> dict:
        return {
            "row": row, "pth1": t.pth1, "txt1": t.txt1, "txt2": t.txt2, "edit": t.edit,
            "scores": t.scores, "group": masked_caption_group(t.txt1, t.txt2),
        }  # fmt: skip

    if epoch == "triplet":
        return [
            {
                "key": f"r{row:09d}",
                "target": t.pth2,
                "target_id": target_ids[t.pth2],
                "triplets": [triplet(row, t)],
            }
            for row, t in enumerate(rows)
        ]
    if epoch != "target":
        raise ValueError(f"unknown shards.epoch {epoch!r} (target or triplet)")
    by_target: dict[str, list[dict]] = defaultdict(list)
    for row, t in enumerate(rows):
        by_target[t.pth2].append(triplet(row, t))
    return [
        {"key": f"v{target_ids[p]:09d}", "target": p, "target_id": target_ids[p], "triplets": trips}
        for p, trips in sorted(by_target.items(), key=lambda kv: target_ids[kv[0]])
    ]


def _jpeg(frame: np.ndarray, size: int, quality: int) -> bytes:
    image = Image.fromarray(frame)
    if size:
        image = image.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_EMBEDDERS: dict = {}


def _embedder(model_dir: str):
    """The frozen target encoder of an exported model, loaded once per packing process."""
    if model_dir not in _EMBEDDERS:
        from train.checkpoint import load_exported

        model, _ = load_exported(model_dir)
        _EMBEDDERS[model_dir] = model.eval()
    return _EMBEDDERS[model_dir]


def _target_embeddings(frames: np.ndarray, model_dir: str) -> bytes:
    """(Ft, Q, D) float16 target frame embeddings as .npy bytes."""
    import torch

    from data.video import to_model_input

    model = _embedder(model_dir)
    with torch.no_grad():
        pixels = to_model_input(frames, model.hf.config.vision_config.image_size)
        emb = model("encode_target_frames", pixels).numpy().astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, emb)
    return buf.getvalue()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_media(path: Path, n: int) -> np.ndarray:
    """(N, H, W, 3) uint8: `n` frames of a video, or an image as a single frame."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))[None]
        except (OSError, ValueError) as err:
            raise VideoDecodeError(path, f"cannot read image: {err}") from None
    return load_frames(path, n=n)


def _media_path(root: Path, name: str, explicit: str | None) -> Path:
    return Path(explicit) if explicit else video_path(root, name)


def _encode_record(record: dict, job: ShardJob, skipped: list[dict]) -> dict | None:
    root = Path(job.video_root)
    try:
        target = load_media(
            _media_path(root, record["target"], record.get("target_file")), job.target_frames
        )
    except VideoDecodeError as err:
        skipped.append({"key": record["key"], "video": record["target"], "reason": str(err)})
        return None
    sample = {"__key__": record["key"]}
    if job.embed_model:
        sample["target.npy"] = _target_embeddings(target, job.embed_model)
    else:
        for f, frame in enumerate(target):
            sample[f"t{f:02d}.jpg"] = _jpeg(frame, job.frame_size, job.jpeg_quality)
    kept = []
    for trip in record["triplets"]:
        try:
            query = load_media(
                _media_path(root, trip["pth1"], trip.get("query_file")), job.query_frames
            )
        except VideoDecodeError as err:
            skipped.append(
                {
                    "key": record["key"],
                    "row": trip["row"],
                    "video": trip["pth1"],
                    "reason": str(err),
                }
            )
            continue
        for f, frame in enumerate(query):
            sample[f"q{len(kept):03d}_{f}.jpg"] = _jpeg(frame, job.frame_size, job.jpeg_quality)
        kept.append({k: v for k, v in trip.items() if k != "query_file"})
    if not kept:
        return None
    meta = {"target": record["target"], "target_id": record["target_id"], "triplets": kept}
    sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return sample


def pack_shard(job: ShardJob) -> ShardStats:
    """Write one shard atomically and its stats file last. Safe to call again after a crash."""
    start = time.perf_counter()
    out = Path(job.out_dir)
    final, tmp, stats_path = (
        out / f"{job.name}.tar",
        out / f"{job.name}.tar.tmp",
        out / f"{job.name}.stats.json",
    )
    stats = ShardStats(name=job.name, fingerprint=job.fingerprint)
    with tmp.open("wb") as f:
        writer = TarWriter(f, encoder=False, mtime=0.0)
        for record in job.records:
            sample = _encode_record(record, job, stats.skipped)
            if sample is not None:
                writer.write(sample)
                stats.samples += 1
                stats.triplets += len(json.loads(sample["json"])["triplets"])
        writer.close()
    data = tmp.read_bytes()
    stats.bytes, stats.sha256 = len(data), hashlib.sha256(data).hexdigest()
    tmp.replace(final)
    stats.seconds = round(time.perf_counter() - start, 3)
    stats_tmp = stats_path.with_suffix(".tmp")
    stats_tmp.write_text(json.dumps(asdict(stats), indent=1))
    stats_tmp.replace(stats_path)
    return stats


def _fingerprint(source: bytes, cfg: ShardConfig) -> str:
    h = hashlib.sha256(source)
    for k in (
        "epoch",
        "samples_per_shard",
        "query_frames",
        "target_frames",
        "frame_size",
        "jpeg_quality",
        "seed",
        "embed_model",
    ):
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
            video_root=str(media_root),
            out_dir=str(out_dir),
            query_frames=cfg.query_frames,
            target_frames=cfg.target_frames,
            frame_size=cfg.frame_size,
            jpeg_quality=cfg.jpeg_quality,
            fingerprint=fp,
            embed_model=cfg.embed_model,
        )  # fmt: skip
        for i, start in enumerate(range(0, len(records), n))
    ]


def _finished(job: ShardJob) -> ShardStats | None:
    path = Path(job.out_dir) / f"{job.name}.stats.json"
    if not path.is_file() or not (Path(job.out_dir) / f"{job.name}.tar").is_file():
        return None
    stats = ShardStats(**json.loads(path.read_text()))
    if stats.fingerprint != job.fingerprint:
        raise RuntimeError(
            f"{path}: written from other annotations or settings (fingerprint {stats.fingerprint}, "
            f"now {job.fingerprint}); use a fresh output directory"
        )
    return stats


def _run_local(jobs: list[ShardJob], workers: int) -> Iterable[ShardStats]:
    if workers <= 1:
        yield from map(pack_shard, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(pack_shard, jobs)


def _run_ray(jobs: list[ShardJob], address: str | None, workers: int) -> Iterable[ShardStats]:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else max(workers, 1), include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
    remote = ray.remote(num_cpus=1)(pack_shard)
    pending = [remote.remote(job) for job in jobs]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def pack(
    csv_path: str | Path,
    video_root: str | Path,
    out_dir: str | Path,
    cfg: ShardConfig,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = False,
) -> dict:
    """Pack (or finish packing) a WebVid-CoVR CSV and its videos; returns the manifest."""
    csv_path = Path(csv_path)
    records = build_records(read_annotations(csv_path), cfg.epoch)
    fp = _fingerprint(csv_path.read_bytes(), cfg)
    return pack_records(
        records, fp, csv_path, video_root, out_dir, cfg, backend, ray_address, progress
    )


def cirr_records(root: str | Path, split: str, image_root: str | Path | None = None) -> list[dict]:
    """CIRR triplets as records (one per query): the reference and target images as single
    frames, the modification text as the edit, the image set as the sampler group."""
    from data.benchmarks import read_cirr

    queries, gallery = read_cirr(root, split, image_root)
    ids = {name: i for i, name in enumerate(sorted(gallery))}
    records = []
    for q in queries:
        if q.target is None:
            raise ValueError(f"CIRR {split} has no targets: pack the train or val split")
        triplet = {"row": int(q.query_id), "pth1": q.reference, "txt1": "", "txt2": "", "edit": q.caption,
                   "scores": [], "group": f"set{q.extra['set_id']}", "query_file": str(gallery[q.reference])}  # fmt: skip
        records.append({"key": f"c{int(q.query_id):09d}", "target": q.target, "target_id": ids[q.target],
                        "target_file": str(gallery[q.target]), "triplets": [triplet]})  # fmt: skip
    return records


def pack_cirr(
    root: str | Path,
    split: str,
    out_dir: str | Path,
    cfg: ShardConfig,
    image_root: str | Path | None = None,
    backend: str = "local",
    progress: bool = False,
) -> dict:
    """Pack CIRR triplets (for fine-tuning) in the same record layout; returns the manifest."""
    records = cirr_records(root, split, image_root)
    fp = _fingerprint(json.dumps(records, sort_keys=True).encode(), cfg)
    source = Path(root) / "captions" / f"cap.rc2.{split}.json"
    return pack_records(
        records,
        fp,
        source,
        image_root or Path(root) / "img_raw",
        out_dir,
        cfg,
        backend,
        None,
        progress,
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
) -> dict:
    """Pack (or finish packing) records into shards and write the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = plan_jobs(records, fp, media_root, out, cfg)
    done = {job.name: s for job in jobs if (s := _finished(job)) is not None}
    todo = [job for job in jobs if job.name not in done]
    log.info("%d shards planned, %d already complete", len(jobs), len(done))
    runner = (
        _run_ray(todo, ray_address, cfg.workers)
        if backend == "ray"
        else _run_local(todo, cfg.workers)
    )
    for stats in tqdm(runner, total=len(todo), desc="shards", disable=not progress):
        done[stats.name] = stats
    shards = [done[job.name] for job in jobs]
    manifest = {
        "format": "covr-webdataset/1",
        "annotations": str(Path(source).resolve()),
        "media_root": str(Path(media_root).resolve()),
        "config": asdict(cfg),
        "fingerprint": jobs[0].fingerprint if jobs else "",
        "shards": [
            {k: getattr(s, k) for k in ("name", "samples", "triplets", "bytes", "sha256")}
            for s in shards
        ],
        "totals": {
            "shards": len(shards),
            "samples": sum(s.samples for s in shards),
            "triplets": sum(s.triplets for s in shards),
            "bytes": sum(s.bytes for s in shards),
            "skipped": sum(len(s.skipped) for s in shards),
        },
        "skipped": [item for s in shards for item in s.skipped],
        "seconds_this_run": round(time.perf_counter() - start, 2),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {shard_dir}: pack the shards first (launch/shard.py pack)"
        )
    return json.loads(path.read_text())


def verify(shard_dir: str | Path) -> dict:
    """Re-read every shard: checksum, readable tar, record count against the manifest."""
    import tarfile

    manifest = read_manifest(shard_dir)
    report = {"shards": len(manifest["shards"]), "ok": 0, "corrupt": []}
    for entry in manifest["shards"]:
        path = Path(shard_dir) / f"{entry['name']}.tar"
        problem = None
        if not path.is_file():
            problem = "missing"
        else:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problem = f"checksum mismatch ({len(data)} bytes, manifest {entry['bytes']})"
            else:
                try:
                    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                        keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
                    if len(keys) != entry["samples"]:
                        problem = f"{len(keys)} records, manifest says {entry['samples']}"
                except tarfile.TarError as err:
                    problem = f"unreadable tar: {err}"
        if problem:
            report["corrupt"].append({"shard": entry["name"], "problem": problem})
        else:
            report["ok"] += 1
    return report


def pack_splits(corpus_root: str | Path, shard_root: str | Path, cfg: ShardConfig,
                splits=("train", "val", "test"), progress: bool = False) -> dict[str, dict]:  # fmt: skip
    """Pack `<corpus_root>/<split>.csv` (videos under `<corpus_root>/videos`) into
    `<shard_root>/<split>/`; shards already complete are kept (packing resumes)."""
    root = Path(corpus_root)
    return {
        split: pack(
            root / f"{split}.csv", root / "videos", Path(shard_root) / split, cfg, progress=progress
        )
        for split in splits
    }
