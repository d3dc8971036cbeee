"""Embedding a split from its shards and the WebVid-CoVR retrieval protocol.

Gallery = one entry per target record; queries = one triplet of each record, drawn by
`query_triplet` from (seed, record key) as the reference's val evaluates one seeded triplet per
target (test records hold one); the positive of a query is its own record; a gallery item that
is the query's reference video scores -inf.
With several ranks each embeds every world-th record (each record exactly once) and the
embeddings are gathered in record order.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from eval.search import IndexSpec, retrieve
from sharding import format as fmt
from sharding.reader import iter_records


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def query_triplet(key: str, n: int, seed: int) -> int:
    """The triplet of a record evaluated as its query: seeded by record, so the same on any
    world size and in every evaluation."""
    return random.Random(f"{seed}-{key}").randrange(n)


@torch.no_grad()
def embed_split(
    model,
    urls: list[str],
    collate,
    batch_size: int = 64,
    rank: int = 0,
    world: int = 1,
    progress: bool = False,
    seed: int = 1234,
) -> dict:
    """{"query": (Q, Tq, D), "gallery": (G, Tg, D), "positives", "query_refs", "edits",
    "query_sources", "gallery_ids"}. Rows are in record order whatever the world size: query row
    n is triplet `query_sources[n][1]` of the record keyed `query_sources[n][0]`."""
    was_training = model.training
    model.eval()
    mine = [(i, r) for i, r in enumerate(iter_records(urls)) if i % world == rank]
    samples, sources = [], []  # sources: (record index, record key, triplet)
    for i, record in mine:
        meta = fmt.record_meta(record)
        j = query_triplet(record["__key__"], len(meta["triplets"]), seed)
        samples.append(fmt.decode_sample(fmt.raw_triplet(record, j, meta)))
        sources.append((i, record["__key__"], j))
    queries, targets = [], []
    gallery_samples = {}
    for s, (owner, _, _) in zip(samples, sources):
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
        "query_sources": sources,
        "query_refs": [s["pth1"] for s in samples],
        "edits": [s["edit"] for s in samples],
        "gallery_index": gallery_order,
        "gallery_ids": [gallery_samples[i]["target"] for i in gallery_order],
    }
    if was_training:
        model.train()
    parts = _gather_objects(local, world)
    # ranks hold records r, r + world, ...: put gallery and queries back in record order
    gallery_index = [i for p in parts for i in p["gallery_index"]]
    order = sorted(range(len(gallery_index)), key=gallery_index.__getitem__)
    position = {gallery_index[o]: n for n, o in enumerate(order)}
    gallery = torch.cat([p["gallery"] for p in parts if p["gallery"] is not None])[order]
    gallery_ids = [i for p in parts for i in p["gallery_ids"]]
    sources = [s for p in parts for s in p["query_sources"]]
    rows = sorted(range(len(sources)), key=lambda n: (sources[n][0], sources[n][2]))
    query = torch.cat([p["query"] for p in parts if p["query"] is not None])[rows]
    refs, edits = (
        [r for p in parts for r in p["query_refs"]],
        [e for p in parts for e in p["edits"]],
    )
    return {
        "query": query,
        "gallery": gallery,
        "positives": [position[sources[n][0]] for n in rows],
        "query_refs": [refs[n] for n in rows],
        "edits": [edits[n] for n in rows],
        "query_sources": [sources[n][1:] for n in rows],
        "gallery_ids": [gallery_ids[o] for o in order],
    }


def webvid_topk(emb: dict, k: int, reduce: str = "mean", spec: IndexSpec | None = None):
    """Top-k (scores, gallery positions) as the reference's test scores them: the pooled target
    tokens L2-normalised again (training does not), the query's reference video never an
    answer."""
    index = {g: n for n, g in enumerate(emb["gallery_ids"])}
    exclude = [[index[ref]] if ref in index else [] for ref in emb["query_refs"]]
    gallery = F.normalize(torch.as_tensor(emb["gallery"]).float(), dim=-1)
    return retrieve(emb["query"], gallery, k, reduce, exclude, spec)
