"""Sampler groups from packed target embeddings: k-means clusters (FAISS) of the targets' mean
embeddings, written beside the shards as `groups.json` ({target_id: cluster}). Targets in one
cluster look alike, so HNS batches of a cluster are hard negatives for each other. The reader
uses the file instead of the masked-caption group written at packing time when it is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sharding import format as fmt
from sharding.reader import iter_records, open_shards
from sharding.remote import fetch_bytes, is_remote, join

GROUPS = "groups.json"


def kmeans_groups(
    shard_dir: str | Path, k: int, seed: int = 1234, niter: int = 20
) -> dict[int, int]:
    import faiss

    urls = open_shards(shard_dir).urls
    ids, vectors = [], []
    for record in iter_records(urls):
        if fmt.EMBEDDINGS not in record:
            raise ValueError(
                f"{record['__url__']}: no target embeddings (run launch/embed_targets.py first)"
            )
        emb = fmt.decode_npy(record[fmt.EMBEDDINGS]).astype(np.float32)  # (Ft, Q, D)
        vectors.append(emb.reshape(-1, emb.shape[-1]).mean(0))
        ids.append(fmt.record_meta(record)["target_id"])
    x = np.stack(vectors)
    x -= x.mean(0)  # centred: what is common to every target says nothing about likeness
    x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    k = min(k, len(x))
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=True, min_points_per_centroid=1
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    groups = {int(i): int(c) for i, c in zip(ids, assign[:, 0])}
    (Path(shard_dir) / GROUPS).write_text(json.dumps(groups))
    return groups


def read_groups(shard_dir: str | Path) -> dict[int, int] | None:
    """The k-means groups beside the shards (local or remote), or None where there are none."""
    path = join(shard_dir, GROUPS)
    try:
        text = fetch_bytes(path) if is_remote(path) else path.read_bytes()
    except FileNotFoundError:
        return None
    return {int(k): v for k, v in json.loads(text).items()}
