"""Embedding a split from its shards and the WebVid-CoVR retrieval protocol.

Gallery = one entry per target record; queries = every triplet of every record; the positive of
a query is its own record; a gallery item that is the query's reference video scores -inf.
With several ranks each embeds every world-th record (each record exactly once) and the
embeddings are gathered in record order.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from tqdm import tqdm

from eval.search import IndexSpec, retrieve
from sharding.reader import decode_sample, iter_records, record_triplet


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def embed_split(model, urls: list[str], collate, batch_size: int = 64, rank: int = 0, world: int = 1,
                progress: bool = False) -> dict:  # fmt: skip
    """{"query": (Q, Tq, D), "gallery": (G, Tg, D), "positives", "query_refs", "gallery_ids"}"""
    was_training = model.training
    model.eval()
    mine = [(i, r) for i, r in enumerate(iter_records(urls)) if i % world == rank]
    samples, owners = [], []
    for i, record in mine:
        meta = json.loads(record["json"])
        for j in range(len(meta["triplets"])):
            samples.append(decode_sample(record_triplet(record, j, meta)))
            owners.append(i)
    queries, targets = [], []
    gallery_samples = {}
    for s, owner in zip(samples, owners):
        gallery_samples.setdefault(owner, s)
    gallery_order = sorted(gallery_samples)
    bar = tqdm(
        total=len(samples) + len(gallery_order), desc="embed", disable=not progress or rank != 0
    )
    for k in range(0, len(samples), batch_size):
        b = collate(samples[k : k + batch_size])
        queries.append(
            model("encode_query", b["query_frames"], b["input_ids"], b["attention_mask"])
            .float()
            .cpu()
        )
        bar.update(len(samples[k : k + batch_size]))
    chunk = [gallery_samples[i] for i in gallery_order]
    for k in range(0, len(chunk), batch_size):
        b = collate(chunk[k : k + batch_size])
        source = b.get("target_embeddings", b.get("target_frames"))
        targets.append(
            model("encode_target", source, b["target_scores"], b["target_mask"]).float().cpu()
        )
        bar.update(len(chunk[k : k + batch_size]))
    bar.close()
    local = {
        "query": torch.cat(queries) if queries else None,
        "gallery": torch.cat(targets) if targets else None,
        "query_owner": owners,
        "query_refs": [s["pth1"] for s in samples],
        "edits": [s["edit"] for s in samples],
        "gallery_index": gallery_order,
        "gallery_ids": [gallery_samples[i]["target"] for i in gallery_order],
    }
    if was_training:
        model.train()
    parts = _gather_objects(local, world)
    gallery_index = [i for p in parts for i in p["gallery_index"]]
    order = sorted(range(len(gallery_index)), key=gallery_index.__getitem__)
    position = {gallery_index[o]: n for n, o in enumerate(order)}
    gallery = torch.cat([p["gallery"] for p in parts if p["gallery"] is not None])[order]
    gallery_ids = [i for p in parts for i in p["gallery_ids"]]
    return {
        "query": torch.cat([p["query"] for p in parts if p["query"] is not None]),
        "gallery": gallery,
        "positives": [position[o] for p in parts for o in p["query_owner"]],
        "query_refs": [r for p in parts for r in p["query_refs"]],
        "edits": [e for p in parts for e in p["edits"]],
        "gallery_ids": [gallery_ids[o] for o in order],
    }


def webvid_topk(emb: dict, k: int, reduce: str = "mean", spec: IndexSpec | None = None):
    """FAISS top-k (scores, gallery positions); the query's reference video is never an answer."""
    index = {g: n for n, g in enumerate(emb["gallery_ids"])}
    exclude = [[index[ref]] if ref in index else [] for ref in emb["query_refs"]]
    return retrieve(emb["query"], emb["gallery"], k, reduce, exclude, spec)
