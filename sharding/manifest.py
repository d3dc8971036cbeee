"""`manifest.json` beside the shards (what was packed from what, with counts, sizes, checksums and
skipped samples) and `verify`, which re-reads every shard against it."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

from configs.schema import ShardConfig
from sharding import format as fmt
from sharding.remote import Fetch, join, read_bytes, read_json
from sharding.writer import ShardStats

MANIFEST = "manifest.json"


def shard_summary(shards: list[ShardStats], base: dict | None = None) -> dict:
    """The manifest's `shards`, `totals` and `skipped` for these shards; `base` (the manifest of
    the shards these were made from) adds what was already lost before them."""
    base_totals = (base or {}).get("totals", {})
    return {
        "shards": [
            {k: getattr(s, k) for k in ("name", "samples", "triplets", "bytes", "sha256")}
            for s in shards
        ],
        "totals": {
            **base_totals,
            "shards": len(shards),
            "samples": sum(s.samples for s in shards),
            "triplets": sum(s.triplets for s in shards),
            "bytes": sum(s.bytes for s in shards),
            # records and triplets not packed (a lost record's triplets counted too)
            "skipped_records": base_totals.get("skipped_records", 0)
            + sum(s.skipped_records for s in shards),
            "skipped_triplets": base_totals.get("skipped_triplets", 0)
            + sum(s.skipped_triplets for s in shards),
        },
        "skipped": (base or {}).get("skipped", []) + [item for s in shards for item in s.skipped],
    }


def packed_manifest(
    shards: list[ShardStats],
    source: str | Path,
    media_root: str | Path,
    cfg: ShardConfig,
    fingerprint: str,
    start: float,
    split: str = "",
) -> dict:
    """What `sharding.pack` made, from what; `start` is the run's perf_counter start."""
    return {
        "format": fmt.FORMAT,
        "split": split,
        "annotations": str(Path(source).resolve()),
        "media_root": str(Path(media_root).resolve()),
        "config": asdict(cfg),
        "fingerprint": fingerprint,
        **shard_summary(shards),
        "seconds_this_run": round(time.perf_counter() - start, 2),
    }


def write_manifest(out_dir: str | Path, manifest: dict) -> dict:
    """`out_dir/manifest.json`, atomically (the one manifest writer: packing and embedding)."""
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(Path(out_dir) / MANIFEST)
    return manifest


def read_manifest(shard_dir: str | Path, fetch: Fetch | None = None) -> dict:
    """The manifest of a local or remote (`sharding.remote`) shard directory."""
    try:
        return read_json(join(shard_dir, MANIFEST), fetch)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(
            f"no {MANIFEST} in {shard_dir}: pack the shards first (launch/shard.py pack)"
        ) from None


def verify(shard_dir: str | Path, fetch: Fetch | None = None) -> dict:
    """Re-read every shard (local or remote): checksum, readable tar, record count against the
    manifest."""
    manifest = read_manifest(shard_dir, fetch)
    report = {"shards": len(manifest["shards"]), "ok": 0, "corrupt": []}
    for entry in manifest["shards"]:
        problem = None
        try:
            data = read_bytes(join(shard_dir, f"{entry['name']}.tar"), fetch)
        except FileNotFoundError:
            problem = "missing"
        except OSError as err:  # a remote read that failed on every attempt
            problem = f"unreadable: {err}"
        else:
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problem = f"checksum mismatch ({len(data)} bytes, manifest {entry['bytes']})"
            else:
                try:
                    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                        keys = {fmt.record_key(m.name) for m in tar.getmembers()}
                    if len(keys) != entry["samples"]:
                        problem = f"{len(keys)} records, manifest says {entry['samples']}"
                except tarfile.TarError as err:
                    problem = f"unreadable tar: {err}"
        if problem:
            report["corrupt"].append({"shard": entry["name"], "problem": problem})
        else:
            report["ok"] += 1
    return report
