"""Shard -> shard: target frames replaced by the frozen starting model's embeddings, once.

The reference computes its targets once with the frozen starting model and trains against the
stored values; this is that step for our shards. Every record of a packed split is rewritten with
its target JPEGs replaced by `target.npy` (Ft, Q, D) float16 per-frame embeddings and the
triplets' target captions by `caption.npy` (T, D) float16 (`sharding.format.embedded_record`);
query frames and metadata are copied byte for byte. The reader already reads that layout, so
training on the output directory runs the query side only.

The model is passed in (`TargetEncoder`: `train.embedder` builds it), so this module stays below
training. With several ranks, shard i goes to rank i % world. Each output shard is written as
`NAME.tar.tmp`, renamed when complete, then `NAME.stats.json` last (the completion marker, which
carries the encoder's fingerprint): a rerun skips finished shards, so a killed job resumes. Rank 0
writes `manifest.json` (the source's, with the new sizes and an `embedded` section) once all ranks
are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sharding import format as fmt
from sharding.manifest import read_manifest, shard_summary, write_manifest
from sharding.reader import read_shard
from sharding.writer import ShardStats, finished, write_shard

log = logging.getLogger(__name__)


class TargetEncoder(Protocol):
    fingerprint: str  # names the weights and settings the embeddings come from
    info: dict  # what to record about the model in the manifest

    def frames(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, Q, D) float16."""

    def captions(self, texts: list[str]) -> np.ndarray:
        """n texts -> (n, D) float16."""


class EmbedError(ValueError):
    """Shards that cannot be embedded, an output directory from another encoder, or embedded
    shards that do not fit the model about to read them."""


def _chunks(records: Iterator[dict], frames_per_batch: int) -> Iterator[list[dict]]:
    """Consecutive records holding about `frames_per_batch` target frames together."""
    chunk, frames = [], 0
    for record in records:
        chunk.append(record)
        frames += len(fmt.target_jpegs(record))
        if frames >= frames_per_batch:
            yield chunk
            chunk, frames = [], 0
    if chunk:
        yield chunk


def _embed_chunk(
    chunk: list[dict], encoder: TargetEncoder, stats: ShardStats, strict: bool = False
) -> list[dict]:
    """The chunk's records with embedded targets; a record whose target frames are missing or do
    not decode is skipped and listed in `stats.skipped` (`strict`, a test split: an error)."""
    decoded, kept = [], []
    for record in chunk:
        key = record["__key__"]
        if fmt.EMBEDDINGS in record:
            raise EmbedError(
                f"{record.get('__url__')}: record {key} already holds target "
                "embeddings (embed the packed JPEG shards)"
            )
        try:
            jpegs = fmt.target_jpegs(record)
            if not jpegs:
                raise fmt.ImageDecodeError("no target frames")
            decoded.append(fmt.decode_frames(jpegs))
            kept.append(record)
        except fmt.ImageDecodeError as err:
            if strict:
                raise EmbedError(
                    f"{record.get('__url__')}: record {key}: target {err} (a test "
                    "split loses nothing: repack it)"
                ) from None
            meta = fmt.record_meta(record)
            rows = [t["row"] for t in meta["triplets"]]
            stats.skipped.append(
                {"key": key, "video": meta["target"], "rows": rows, "reason": f"target: {err}"}
            )
            stats.skipped_records += 1
            stats.skipped_triplets += len(rows)
    if not kept:
        return []
    embedded = encoder.frames(np.concatenate(decoded))
    metas = [fmt.record_meta(r) for r in kept]
    texts = sorted({t["txt2"] for m in metas for t in m["triplets"]})
    caption_of = dict(zip(texts, encoder.captions(texts))) if texts else {}
    out, start = [], 0
    for record, frames, meta in zip(kept, decoded, metas):
        target = embedded[start : start + len(frames)]
        start += len(frames)
        captions = np.stack([caption_of[t["txt2"]] for t in meta["triplets"]])
        out.append(fmt.embedded_record(record, target, captions))
    return out


def embed_shard(
    src: Path,
    out_dir: Path,
    name: str,
    rewrite: Callable[[list[dict], ShardStats, bool], list[dict]],
    fingerprint: str,
    frames_per_batch: int = 256,
    strict: bool = False,
) -> ShardStats:
    """Write `out_dir/NAME.tar` from `src`, chunk by chunk through `rewrite(records, stats,
    strict)`, atomically, and its stats file last."""
    start = time.perf_counter()
    stats = ShardStats(name=name, fingerprint=fingerprint)
    samples = (
        sample
        for chunk in _chunks(read_shard(str(src)), frames_per_batch)
        for sample in rewrite(chunk, stats, strict)
    )
    return write_shard(out_dir, name, samples, stats, start)


def weights_fingerprint(tensors: dict, settings: dict) -> str:
    """A short hash naming weights and settings: each tensor's name, shape and about 4,096 values
    spread over it (cheap for a billion parameters; weights that differ, like a fine-tuned copy,
    differ there), rounded to bf16 so a bf16 engine's copy of the same weights (an export after
    bf16 training) names the same; and the settings as JSON."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float().cpu().numpy()
        h.update(f"{name}{tuple(tensors[name].shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def shard_fingerprint(encoder_fingerprint: str, source_sha256: str) -> str:
    return hashlib.sha256(f"{encoder_fingerprint}/{source_sha256}".encode()).hexdigest()[:16]


def embed_dir(
    src_dir: str | Path,
    out_dir: str | Path,
    encoder: TargetEncoder,
    rank: int = 0,
    world: int = 1,
    frames_per_batch: int = 256,
    gather: Callable[[list], list[list]] | None = None,
    progress: Callable[[str], None] | None = None,
    rewrite: Callable[[list[dict], ShardStats, bool], list[dict]] | None = None,
) -> dict | None:
    """Embed this rank's shards (i % world == rank) of one packed split; finished shards are
    skipped. `gather(obj)` returns every rank's `obj` (an all-gather; needed when world > 1).
    Rank 0 then writes and returns the manifest (None on other ranks). `rewrite` replaces the
    model's encoding of a chunk of records (`sharding.released`: stored embeddings)."""
    if rewrite is None:

        def rewrite(chunk, stats, strict):
            return _embed_chunk(chunk, encoder, stats, strict)

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir)
    if "embedded" in manifest:
        raise EmbedError(f"{src_dir}: already embedded (from {manifest['embedded']['source']})")
    out_dir.mkdir(parents=True, exist_ok=True)
    mine: dict[str, ShardStats] = {}
    for i, entry in enumerate(manifest["shards"]):
        if i % world != rank:
            continue
        name = entry["name"]
        fp = shard_fingerprint(encoder.fingerprint, entry["sha256"])
        stats = finished(out_dir, name, fp)
        if stats is None:
            stats = embed_shard(
                src_dir / f"{name}.tar",
                out_dir,
                name,
                rewrite,
                fp,
                frames_per_batch,
                strict=manifest.get("split") == "test" and not manifest.get("subset"),
            )
            if progress:
                progress(f"{out_dir / name}.tar: {stats.samples} records in {stats.seconds:.1f}s")
        mine[name] = stats
    parts = gather(mine) if world > 1 else [mine]
    if rank != 0:
        return None
    done = {name: s for part in parts for name, s in part.items()}
    shards = [done[entry["name"]] for entry in manifest["shards"]]
    embedded = {
        "source": str(src_dir.resolve()),
        "fingerprint": encoder.fingerprint,
        **encoder.info,
    }
    return write_manifest(
        out_dir, {**manifest, **shard_summary(shards, manifest), "embedded": embedded}
    )


def check_embedded(manifest: dict, shard_dir, model) -> None:
    """Shards holding precomputed targets must come from this model's frozen target path (and
    targets must not be trained): else one error naming the directory and both fingerprints.
    The reference's released embeddings (`sharding.released`) are used exactly when the model
    says `released_targets`, and must have its target layout (their weights cannot be compared
    with ours)."""
    embedded = manifest.get("embedded")
    released = bool(embedded and embedded.get("released"))
    if model.cfg.released_targets and not released:
        held = "our own target embeddings" if embedded else "target frames"
        raise EmbedError(
            f"{shard_dir}: holds {held}, but model.released_targets=true: released and own "
            "targets are never mixed (import the released ones with launch/shard.py "
            "import-released, or set model.released_targets=false)"
        )
    if embedded is None:
        return
    if model.cfg.train_target_encoder:
        raise EmbedError(
            f"{shard_dir}: holds precomputed target embeddings, but "
            "model.train_target_encoder=true needs the target frames: train on the "
            f"packed JPEG shards ({embedded['source']})"
        )
    if released:
        layout, ours = tuple(embedded["layout"]), tuple(model.target_token_shape())
        if not model.cfg.released_targets:
            raise EmbedError(
                f"{shard_dir}: holds the reference's released target embeddings (from "
                f"{embedded['dir']}): set model.released_targets=true to use them, or embed "
                "the packed shards with this model (launch/embed_targets.py)"
            )
        if layout != ours:
            raise EmbedError(
                f"{shard_dir}: released target embeddings of (tokens, dims) {layout}; this "
                f"model's targets are {ours} ({model.cfg.arch})"
            )
        return
    ours = model.target_fingerprint()
    if embedded["fingerprint"] != ours:
        raise EmbedError(
            f"{shard_dir}: target embeddings from another model (fingerprint "
            f"{embedded['fingerprint']}, {embedded.get('pretrained')}); this model's "
            f"frozen targets have {ours}: embed the shards again with this config"
        )
