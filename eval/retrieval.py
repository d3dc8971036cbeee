"""Embedding a split from its shards and the WebVid-CoVR retrieval protocol.

Gallery = one entry per target record; queries = one triplet of each record, drawn by
`query_triplet` from (seed, record key) as the reference's val evaluates one seeded triplet per
target (test records hold one); the positive of a query is its own record; a gallery item that
is the query's reference video scores -inf.
Records stream through `eval.embed.distributed_embed`: each rank decodes and embeds every
world-th record, a batch at a time, and the embeddings come back in record order.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from eval.embed import distributed_embed, eval_mode
from eval.search import IndexSpec, retrieve
from sharding import format as fmt
from sharding.batch import Task, device_of, query_inputs, to_device
from sharding.reader import iter_records


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
    reduce: str = "mean",
) -> dict:
    """{"query": (Q, Tq, D), "gallery": (G, Tg, D), "positives", "query_refs", "edits",
    "query_sources", "gallery_ids"}, one query and one gallery row per record, in record order
    whatever the world size: query row n is triplet `query_sources[n][1]` of the record keyed
    `query_sources[n][0]`, and its positive is gallery row n. Rows are kept as the test
    compares them (`compared_rows`): with `mean`, Tq = Tg = 1."""
    rows = []  # every record's (key, triplet, reference, edit, target): metadata only

    def records():
        for record in iter_records(urls):
            meta = fmt.record_meta(record)
            j = query_triplet(record["__key__"], len(meta["triplets"]), seed)
            trip = meta["triplets"][j]
            rows.append((record["__key__"], j, trip["pth1"], trip["edit"], meta["target"]))
            yield record, j, meta

    def embed(chunk):
        samples = [fmt.decode_sample(fmt.raw_triplet(r, j, meta)) for r, j, meta in chunk]
        b = to_device(collate(samples), device_of(model))
        query = model(Task.ENCODE_QUERY, *query_inputs(b))
        source = b.get("target_embeddings", b.get("target_frames"))
        target = model(Task.ENCODE_TARGET, source, b["target_scores"], b["target_mask"])
        return compared_rows(query, target, reduce)

    with eval_mode(model):
        query, gallery = distributed_embed(
            records(), embed, batch_size, rank, world, "embed", progress
        )
    return {
        "query": query,
        "gallery": gallery,
        "positives": list(range(len(rows))),
        "query_refs": [r[2] for r in rows],
        "edits": [r[3] for r in rows],
        "query_sources": [r[:2] for r in rows],
        "gallery_ids": [r[4] for r in rows],
    }


def compared_rows(query: torch.Tensor, target: torch.Tensor, reduce: str):
    """What the reference's WebVid-CoVR test compares of a batch: the target tokens
    L2-normalised again (training does not). With `mean` only the token means enter a score,
    so only they are kept: at BLIP-2's 32 target tokens, 32x less to hold and gather (1 GB
    instead of 32 GB for a gallery of 1M)."""
    target = F.normalize(target.float(), dim=-1)
    if reduce == "mean":
        return query.float().mean(1, keepdim=True), target.mean(1, keepdim=True)
    return query, target


def webvid_topk(emb: dict, k: int, reduce: str = "mean", spec: IndexSpec | None = None):
    """Top-k (scores, gallery positions) of `embed_split`'s rows (`compared_rows`), the query's
    reference video never an answer."""
    index = {g: n for n, g in enumerate(emb["gallery_ids"])}
    exclude = [[index[ref]] if ref in index else [] for ref in emb["query_refs"]]
    return retrieve(emb["query"], emb["gallery"], k, reduce, exclude, spec)
