"""Video benchmarks with several targets per query (docs/PROTOCOLS.md), each an `Evaluation`.

- `tfcovr`: mAP@K (5, 10, 25, 50; 50 the headline) over one gallery, the query's own clip never
  an answer; R@K of the row's `target_video`.
- `egocvr`: R@1/5/10 over each query's global gallery and R@1/2/3 over its local one (clips of
  the same long video); a query is a hit when any of its targets is in the top K; a query whose
  gallery holds fewer than 2 clips is left out, as the official script does.

Clips are decoded from their mp4 files: a query is its clip's middle frame with the text (as
WebVid-CoVR queries), a gallery item its clip's `target_frames` frames spread over it, pooled by
the model's target path with uniform weights, tokens L2-normalised again (the WebVid-CoVR test's
rule). Scores are exact (every query against every allowed item); among equal scores the
irrelevant items rank first (`eval.metrics.pessimistic_order`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.text import tokenize
from data.video import load_frames
from data.video_benchmarks import read_egocvr, read_tfcovr
from eval.coverage import full
from eval.embed import distributed_embed, eval_mode
from eval.metrics import map_at_k, pessimistic_order, recall_any_at_k
from eval.protocols import (
    EvalSettings,
    Evaluation,
    Images,
    build_evaluation,
    check_choice,
    check_text_len,
    stack_ragged,
)
from eval.retrieval import compared_rows
from eval.similarity import similarity
from sharding.batch import Task, device_of, to_device

KS = {"tfcovr": (5, 10, 25, 50), "egocvr": (1, 5, 10), "egocvr-local": (1, 2, 3)}
TFCOVR_GALLERIES = {
    "rows": "one item per test row's target_video, repeats kept (the official test)",
    "unique": "each clip once",
}
EGOCVR_MIN_GALLERY = 2  # the official script's --min_gallery_size default


def embed_clips(model, tokenizer, queries, clips, gallery, s: EvalSettings, frames: int):
    """(query rows, gallery rows) as `compared_rows` keeps them, gallery rows in `gallery`'s
    order (each clip embedded once)."""
    size = model.hf.config.vision_config.image_size
    reduce = s.reduce
    args = dict(batch_size=s.batch_size, rank=s.rank, world=s.world, progress=s.progress)

    def query_batch(chunk):
        text = tokenize(
            tokenizer, [q.caption for q in chunk], s.text_len, model.cfg.edit_words, "longest"
        )
        pixels = torch.stack([load_frames(clips[q.reference], n=1, size=size) for q in chunk])
        inputs = to_device((pixels, text.input_ids, text.attention_mask), device_of(model))
        return model(Task.ENCODE_QUERY, *inputs)

    def target_batch(chunk):
        pixels = torch.stack([load_frames(clips[c], n=frames, size=size) for c in chunk])
        return model(Task.ENCODE_TARGET, pixels.to(device_of(model)))

    unique = list(dict.fromkeys(gallery))
    with eval_mode(model):
        query = distributed_embed(queries, query_batch, desc="queries", total=len(queries), **args)
        target = distributed_embed(unique, target_batch, desc="gallery", total=len(unique), **args)
    query, target = compared_rows(query, target, reduce)
    position = {c: n for n, c in enumerate(unique)}
    return query, target[[position[c] for c in gallery]]


def ranked(query, gallery, ids, allowed, relevant, k: int, reduce: str):
    """Per query: the top `k` among `allowed[i]` (gallery positions), pessimistic under ties
    (`relevant[i]`: the relevant positions): their ids, scores and positions."""
    top_ids, top_scores, top_rows = [], [], []
    for i, rows in enumerate(allowed):
        rows = np.asarray(rows, dtype=np.int64)
        scores = similarity(query[i : i + 1], gallery[rows], reduce)[0].numpy()
        order = pessimistic_order(scores, [int(r) in relevant[i] for r in rows])[:k]
        top_ids.append([ids[rows[j]] for j in order])
        top_scores.append(scores[order])
        top_rows.append([int(rows[j]) for j in order])
    return top_ids, top_scores, top_rows


def _images(clips: dict[str, Path], references: list[str]) -> Images:
    return Images(
        query=lambda i: load_frames(clips[references[i]], n=1)[0],
        gallery=lambda g: load_frames(clips[g], n=1)[0],
    )


def _evaluation(protocol, metrics, queries, ids, found, query, gallery, clips) -> Evaluation:
    top_ids, top_scores = found[:2]
    scores = stack_ragged([np.asarray(row, dtype=np.float32)[None] for row in top_scores])
    return build_evaluation(
        protocol,
        metrics,
        queries,
        (ids, query, gallery, scores, top_ids),
        _images(clips, [q.reference for q in queries]),
        full(len(queries), len(set(ids))),
    )


def tfcovr(
    model,
    tokenizer,
    root,
    split: str = "test",
    video_dir=None,
    settings: EvalSettings | None = None,
    gallery_rule: str = "rows",
    target_frames: int = 15,
) -> Evaluation:
    s = settings or EvalSettings()
    check_text_len(model, s.text_len)
    check_choice("tfcovr_gallery", gallery_rule, TFCOVR_GALLERIES)
    ks = s.ks or KS["tfcovr"]
    bench = read_tfcovr(root, split, video_dir)
    ids = bench.gallery if gallery_rule == "rows" else list(dict.fromkeys(bench.gallery))
    query, gallery = embed_clips(
        model, tokenizer, bench.queries, bench.clips, ids, s, target_frames
    )
    allowed = [[r for r, c in enumerate(ids) if c != q.reference] for q in bench.queries]
    rows_of: dict[str, set[int]] = {}
    for r, c in enumerate(ids):
        rows_of.setdefault(c, set()).add(r)
    relevant = [set().union(*(rows_of.get(t, set()) for t in q.targets)) for q in bench.queries]
    found = ranked(query, gallery, ids, allowed, relevant, max(max(ks), 50), s.reduce)
    metrics = {
        f"mAP@{k}": v for k, v in map_at_k(found[0], [q.targets for q in bench.queries], ks).items()
    }
    r = recall_any_at_k(found[0], [[q.target] for q in bench.queries], ks)
    metrics.update({f"R@{k}": v for k, v in r.items()})
    evaluation = _evaluation(
        "tfcovr", metrics, bench.queries, ids, found, query, gallery, bench.clips
    )
    evaluation.conventions = {
        "gallery": TFCOVR_GALLERIES[gallery_rule] + "; the query's own clip removed",
        "metrics": "mAP@K: CIRCO's AP, denominator min(K, len(target_videos_ids)); "
        "R@K: the row's target_video, a hit counted once",
        "query_text": "modification, 0.5-7 in half steps as words, 30 words (the official test)",
        "frames": f"query: the middle frame; targets: {target_frames} frames, uniform pooling",
        "ties": "irrelevant items first",
    }
    return evaluation


def egocvr(
    model,
    tokenizer,
    root,
    video_dir=None,
    settings: EvalSettings | None = None,
    text: str = "instruction",
    target_frames: int = 15,
) -> Evaluation:
    s = settings or EvalSettings()
    check_text_len(model, s.text_len)
    bench = read_egocvr(root, video_dir, text)
    ids = bench.gallery  # one item per egocvr_data.csv row, as the official script ranks
    query, gallery = embed_clips(
        model, tokenizer, bench.queries, bench.clips, ids, s, target_frames
    )
    metrics, found = {}, None
    for name, ks in (("global", s.ks or KS["egocvr"]), ("local", KS["egocvr-local"])):
        galleries = [q.extra[f"{name}_rows"] for q in bench.queries]
        kept = [i for i, g in enumerate(galleries) if len(g) >= EGOCVR_MIN_GALLERY]
        allowed = [galleries[i] for i in kept]
        relevant = [set(bench.queries[i].extra["target_rows"]) for i in kept]
        top = ranked(query[kept], gallery, ids, allowed, relevant, max(ks), s.reduce)
        r = recall_any_at_k(top[2], relevant, ks)
        metrics.update({f"{name}_R@{k}": v for k, v in r.items()})
        metrics[f"{name}_queries"] = len(kept)
        if name == "global":  # the report shows the global ranking
            found = ([[] for _ in bench.queries], [np.zeros(0)] * len(bench.queries))
            for j, i in enumerate(kept):
                found[0][i], found[1][i] = top[0][j], top[1][j]
    evaluation = _evaluation(
        "egocvr", metrics, bench.queries, ids, found, query, gallery, bench.clips
    )
    evaluation.conventions = {
        "gallery": "global_idx / local_idx of egocvr_annotations_gallery.csv: rows of "
        "egocvr_data.csv, a clip listed in several rows is ranked once per row",
        "metrics": "R@K: a hit when the last egocvr_data.csv row of any target clip is in the "
        f"top K (the official index_mapping); queries whose gallery has fewer than "
        f"{EGOCVR_MIN_GALLERY} rows left out (counted in *_queries)",
        "query_text": text,
        "frames": f"query: the middle frame; targets: {target_frames} frames, uniform pooling",
        "ties": "irrelevant items first",
    }
    return evaluation
