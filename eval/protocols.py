"""The benchmark protocols of docs/METHOD.md §5, each returning an `Evaluation`.

- `webvid_covr`: a split's shards; gallery = its targets, the query's reference removed.
- `cirr`: val R@K and Recall_subset@K (rank among the query's image set minus the reference);
  test writes the two evaluation-server files. The gallery is the split file's images
  (`cirr_gallery="folder"`: every image of their folder, as CoVR); Recall_subset credits
  `target_hard` (`cirr_subset_credit="soft"`: the best `target_soft` score, as CoVR).
- `fashioniq`: R@10 / R@50 per category and their average; the candidate (reference) image is
  removed from its ranking (CoVR's rule; `fashioniq_gallery="clip4cir"` keeps it).
- `circo`: mAP@K (several correct targets) and, as CoVR, R@K of the one `target_img_id`;
  test writes the top-50 submission.
All search through `eval.search.retrieve` (exact by default); every rank embeds its share of the
items. Query edits are tokenised as the reference's test scripts do: `pre_caption`, at most
`EVAL_TEXT_LEN` (64) tokens, padded to the longest in the batch. Each Evaluation says in
`conventions` which rules it followed (written to results.json).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.benchmarks import (
    FASHIONIQ_CATEGORIES,
    CompositionQuery,
    read_circo,
    read_cirr,
    read_fashioniq,
)
from eval.coverage import Coverage, image_subset, shard_coverage
from eval.embed import embed_image_queries, embed_images
from eval.metrics import item_ranks, map_at_k, pessimistic_order
from eval.search import IndexSpec, recall_from_topk, retrieve
from eval.similarity import similarity
from sharding import format as fmt
from sharding.embed import check_embedded
from sharding.format import decode_rgb
from sharding.reader import ShardSet, iter_records, open_shards

PROTOCOLS = ("webvid-covr", "dense-webvid-covr", "cirr", "fashioniq", "circo", "tfcovr", "egocvr")
# the query text of CIRCO: the relative caption alone (CoVR, SEARLE, LinCIR) or with the shared
# concept (MagicLens, google-deepmind/magiclens data_utils.py)
CIRCO_TEXTS = {
    "relative": "relative_caption",
    "concept": "find {shared_concept} but {relative_caption}",
}
FASHIONIQ_GALLERIES = {
    "covr": "candidate removed (CoVR, src/test/*/fashioniq.py)",
    "clip4cir": "candidate kept (CLIP4Cir)",
}
# CoVR's CIRR val numbers (src/test/*/cirr_val.py) rank against a whole folder: every embedding
# in CIRR/<model>-embs-large/dev, made from all of images/dev, 8,102 asserted; our default ranks
# the 2,297 images of the split file
CIRR_GALLERIES = {
    "split": "the split file's images (image_splits/split.rc2.<split>.json)",
    "folder": "every image in the split's image folder (CoVR, src/test/*/cirr_val.py)",
}
CIRR_SUBSET_CREDITS = {
    "hard": "target_hard only",
    "soft": "best target_soft score in the top K, floored at 0 (CoVR, src/test/*/cirr_val.py)",
}
EVAL_TEXT_LEN = 64  # the reference's test tokenisation (src/test/*/*.py: longest, max 64)
# each benchmark's standard K: R@K (webvid-covr, cirr, fashioniq), mAP@K and R@K (circo)
KS = {
    "webvid-covr": (1, 5, 10, 50),
    "cirr": (1, 5, 10, 50),
    "fashioniq": (10, 50),
    "circo": (5, 10, 25, 50),
}
# edit tokens per protocol; Dense-WebVid-CoVR's edits are dense descriptions, far longer than
# WebVid-CoVR's: 64 tokens would cut them (its official test code is not public)
TEXT_LEN = {"dense-webvid-covr": 128}


@dataclass
class Images:
    """Where a report's pictures come from (loaders, not results): query row -> the picture of
    its reference, gallery id -> its picture, both uint8 (H, W, 3)."""

    query: Callable[[int], np.ndarray]
    gallery: Callable[[str], np.ndarray]


@dataclass
class Evaluation:
    """What a protocol found: metrics, each query's ranked gallery ids and the embeddings (what
    explanations need); `images` fetches the pictures of its rows for reports."""

    protocol: str
    metrics: dict
    query_ids: list[str]
    edits: list[str]
    references: list[str]
    positives: list[list[str]]  # ground-truth gallery ids ([] on test splits)
    top_ids: list[list[str]]
    top_scores: np.ndarray
    gallery_ids: list[str]
    query_emb: torch.Tensor
    gallery_emb: torch.Tensor
    images: Images
    files: list[Path] = field(default_factory=list)  # submissions written
    conventions: dict = field(default_factory=dict)  # the protocol's rules as run (results.json)
    coverage: Coverage | None = None  # how much of the split was evaluated (eval.coverage)

    def ranking_of(self, i: int, k: int) -> list[str]:
        return self.top_ids[i][:k]

    def shown_target(self, i: int) -> str | None:
        """Query `i`'s first ground-truth target that is in the gallery (TF-CoVR lists targets
        the gallery lacks), the one reports and explanations show; None when there is none."""
        if not hasattr(self, "_in_gallery"):
            self._in_gallery = set(self.gallery_ids)
        return next((t for t in self.positives[i] if t in self._in_gallery), None)


def _recall_table(top: list[list[str]], scores: np.ndarray, positives: list[str], ks) -> dict:
    width = max(max(ks), max(len(r) for r in top))
    ids = np.array([row + [""] * (width - len(row)) for row in top], dtype=object)
    scores = np.pad(scores, ((0, 0), (0, width - scores.shape[1])), constant_values=-np.inf)
    return {f"R@{k}": v for k, v in recall_from_topk(ids, positives, ks, scores).items()}


def stack_ragged(scores: list[np.ndarray]) -> np.ndarray:
    """Score rows of galleries smaller than K (fewer columns), padded with -inf."""
    width = max(x.shape[1] for x in scores)
    pad = [np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-np.inf) for x in scores]
    return np.concatenate(pad)


def _mean_recalls(metrics: dict, ks) -> None:
    r = [metrics[f"R@{k}"] for k in ks]
    if len(r) >= 3:
        metrics["meanR3"] = sum(r[:3]) / 3
    if len(r) >= 4:
        metrics["meanR4"] = sum(r[:4]) / 4


@dataclass
class EvalSettings:
    ks: tuple = ()  # () = the protocol's standard KS
    reduce: str = "mean"
    batch_size: int = 64
    index: IndexSpec = field(default_factory=IndexSpec)  # flat = exact
    rank: int = 0
    world: int = 1
    progress: bool = False
    text_len: int = EVAL_TEXT_LEN
    fashioniq_gallery: str = "covr"  # covr: the candidate removed; clip4cir: kept
    cirr_gallery: str = "split"  # split: the split file's images; folder: all of their folder
    cirr_subset_credit: str = "hard"  # hard: target_hard; soft: the best target_soft score
    seed: int = 1234  # WebVid-CoVR: which triplet of each target is the query
    subset: bool = False  # image benchmarks: evaluate the images that exist (eval.coverage)
    circo_text: str = "relative"  # CIRCO_TEXTS


def check_choice(key: str, value: str, choices: dict) -> None:
    if value not in choices:
        raise ValueError(f"unknown {key} {value!r}; one of {tuple(choices)}")


def check_text_len(model, text_len: int) -> None:
    """Evaluation's edit tokens must fit the model's text position embeddings."""
    longest = model.cfg.text.max_position_embeddings
    if not 0 < text_len <= longest:
        raise ValueError(
            f"evaluation text tokens {text_len} do not fit the model's {longest} text position "
            "embeddings (eval.text_tokens / --text-tokens)"
        )


def _search_conventions(s: EvalSettings, model) -> dict:
    exact = s.index.kind == "flat"
    return {
        "reduce": s.reduce,
        "search": "exact" if exact else f"approximate ({s.index.kind})",
        "text_tokens": (
            f"pre_caption to {model.cfg.edit_words} words, longest padding, "
            f"at most {s.text_len} tokens"
        ),
        "description": _description_convention(model.cfg),
    }


def _description_convention(cfg) -> str:
    """How a query-video description reaches the query (shard-based splits that carry one)."""
    if cfg.description == "separate":
        return (
            f"separate text where a query has one (at most {cfg.description_tokens} tokens), "
            f"weight {cfg.description_weight:g}"
        )
    return cfg.description


def _search_images(
    model,
    tokenizer,
    queries: list[CompositionQuery],
    gallery: dict[str, Path],
    s: EvalSettings,
    k: int,
    exclude_reference: bool,
):
    check_text_len(model, s.text_len)
    absent = sorted({q.reference for q in queries} - set(gallery))
    if absent:
        raise ValueError(
            f"{len(absent)} reference image id(s) not in the gallery: {', '.join(absent[:10])}"
        )
    queries, gallery, coverage = image_subset(queries, gallery, s.subset)
    ids = list(gallery)
    position = {g: n for n, g in enumerate(ids)}
    args = dict(batch_size=s.batch_size, rank=s.rank, world=s.world, progress=s.progress)
    gallery_emb = embed_images(model, [gallery[g] for g in ids], **args)
    query_emb = embed_image_queries(
        model,
        tokenizer,
        [gallery[q.reference] for q in queries],
        [q.caption for q in queries],
        text_len=s.text_len,
        **args,
    )
    exclude = [[position[q.reference]] if exclude_reference else [] for q in queries]
    scores, top = retrieve(query_emb, gallery_emb, k, s.reduce, exclude, s.index)
    top_ids = [[ids[j] for j in row] for row in top]
    return queries, gallery, coverage, (ids, query_emb, gallery_emb, scores, top_ids)


def picture_images(gallery: dict, queries) -> Images:
    """Report pictures of image benchmarks: a query's reference and a gallery item, by id."""
    return Images(
        query=lambda i: decode_rgb(gallery[queries[i].reference]),
        gallery=lambda g: decode_rgb(gallery[g]),
    )


def build_evaluation(protocol, metrics, queries, found, images: Images, coverage) -> Evaluation:
    """`found`: (gallery ids, query and gallery embeddings, top scores, top ids)."""
    ids, query_emb, gallery_emb, scores, top_ids = found
    return Evaluation(
        protocol=protocol,
        metrics=metrics,
        query_ids=[q.query_id for q in queries],
        edits=[q.caption for q in queries],
        references=[q.reference for q in queries],
        positives=[q.targets for q in queries],
        top_ids=top_ids,
        top_scores=scores,
        gallery_ids=ids,
        query_emb=query_emb,
        gallery_emb=gallery_emb,
        images=images,
        coverage=coverage,
    )


# --- CIRR -------------------------------------------------------------------------------------


def subset_scores(query_emb, gallery_emb, position: dict, members: list[str], reduce: str):
    """Scores of the query against `members` (its image set minus the reference), in order."""
    rows = torch.tensor([position[m] for m in members])
    return similarity(query_emb[None], gallery_emb[rows], reduce)[0]


def subset_credits(queries: list[CompositionQuery], rule: str = "hard") -> list[dict]:
    """What each image earns its query when ranked within the top K of the subset: hard = 1 for
    `target_hard`; soft = its `target_soft` score floored at 0 (the reference: -1 earns 0, 0.5
    half; `target_hard` earns only what `target_soft` gives it)."""
    check_choice("cirr_subset_credit", rule, CIRR_SUBSET_CREDITS)
    if rule == "hard":
        return [{q.target: 1.0} for q in queries]
    return [{g: max(0.0, float(v)) for g, v in q.extra["target_soft"].items()} for q in queries]


def subset_recall(
    member_scores: list, members: list[list[str]], credits: list[dict], ks=(1, 2, 3)
) -> dict:
    """Recall_subset@K (percent): per query, the best credit among the members ranked within
    the top K of its subset's scores (pessimistic ranks: a tie counts against every member)."""
    recall = {}
    ranks = [item_ranks(torch.as_tensor(sc)).tolist() for sc in member_scores]
    for k in ks:
        best = [
            max([0.0] + [credit.get(g, 0.0) for g, r in zip(m, rank) if r < k])
            for m, rank, credit in zip(members, ranks, credits)
        ]
        recall[f"Rsubset@{k}"] = 100.0 * float(np.mean(best))
    return recall


def cirr(
    model,
    tokenizer,
    root,
    split: str = "val",
    image_root=None,
    out_dir=None,
    settings: EvalSettings | None = None,
) -> Evaluation:
    s = settings or EvalSettings(reduce="max")
    ks = s.ks or KS["cirr"]
    # the credit rule before any embedding; read_cirr checks the gallery choice itself
    check_choice("cirr_subset_credit", s.cirr_subset_credit, CIRR_SUBSET_CREDITS)
    queries, gallery = read_cirr(root, split, image_root, s.cirr_gallery)
    queries, gallery, coverage, found = _search_images(
        model, tokenizer, queries, gallery, s, max(max(ks), 50), True
    )
    ids, query_emb, gallery_emb, scores, top_ids = found
    position = {g: n for n, g in enumerate(ids)}
    members = [[m for m in q.subset if m != q.reference] for q in queries]
    member_scores = [
        subset_scores(query_emb[i], gallery_emb, position, m, s.reduce)
        for i, m in enumerate(members)
    ]
    metrics: dict = {}
    evaluation = build_evaluation(
        "cirr", metrics, queries, found, picture_images(gallery, queries), coverage
    )
    evaluation.conventions = {
        **_search_conventions(s, model),
        "gallery": f"{CIRR_GALLERIES[s.cirr_gallery]}, reference removed",
    }
    if queries[0].target is None:  # test split: the server's files
        ranked = [
            [m[j] for j in torch.argsort(sc, descending=True, stable=True).tolist()]
            for m, sc in zip(members, member_scores)
        ]
        evaluation.files = write_cirr_submission(queries, top_ids, ranked, out_dir or ".", split)
        return evaluation
    metrics.update(_recall_table(top_ids, scores, [q.target for q in queries], ks))
    credits = subset_credits(queries, s.cirr_subset_credit)
    metrics.update(subset_recall(member_scores, members, credits))
    evaluation.conventions["subset_credit"] = CIRR_SUBSET_CREDITS[s.cirr_subset_credit]
    if "R@5" in metrics:  # the benchmark's headline average
        metrics["Ravg"] = (metrics["R@5"] + metrics["Rsubset@1"]) / 2
    return evaluation


def write_cirr_submission(
    queries, top_ids, subset_ids, out_dir, split: str = "test1"
) -> list[Path]:
    """The evaluation server's two files (format of the examples shipped with CIRR)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recall = {"version": "rc2", "metric": "recall"}
    subset = {"version": "rc2", "metric": "recall_subset"}
    for q, top, ranked in zip(queries, top_ids, subset_ids):
        recall[q.query_id] = top[:50]
        subset[q.query_id] = ranked[:3]
    paths = [out_dir / f"cirr_{split}_recall.json", out_dir / f"cirr_{split}_recall_subset.json"]
    for path, body in zip(paths, (recall, subset)):
        path.write_text(json.dumps(body))
    return paths


# --- FashionIQ --------------------------------------------------------------------------------


def fashioniq(
    model,
    tokenizer,
    root,
    categories=FASHIONIQ_CATEGORIES,
    split: str = "val",
    settings: EvalSettings | None = None,
) -> Evaluation:
    """R@10 / R@50 per category and averaged; the candidate image is removed from its query's
    ranking (CoVR, `fashioniq_gallery="covr"`) or kept (the CLIP4Cir convention, "clip4cir").
    The returned Evaluation holds the queries of all categories, in order."""
    s = settings or EvalSettings()
    ks = s.ks or KS["fashioniq"]
    check_choice("fashioniq_gallery", s.fashioniq_gallery, FASHIONIQ_GALLERIES)
    remove = s.fashioniq_gallery == "covr"
    metrics: dict = {}
    parts = []
    for cat in categories:
        queries, gallery = read_fashioniq(root, cat, split)
        queries, gallery, coverage, found = _search_images(
            model, tokenizer, queries, gallery, s, max(ks), remove
        )
        for k, v in _recall_table(found[4], found[3], [q.target for q in queries], ks).items():
            metrics[f"{cat}/{k}"] = v
        parts.append(
            build_evaluation(
                "fashioniq", {}, queries, found, picture_images(gallery, queries), coverage
            )
        )
    for k in ks:
        metrics[f"average/R@{k}"] = float(np.mean([metrics[f"{c}/R@{k}"] for c in categories]))
    first = parts[0]
    if len(parts) > 1:  # one view over all categories, for reports
        owner = [(p, i) for p in parts for i in range(len(p.query_ids))]
        first = Evaluation(
            protocol="fashioniq",
            metrics=metrics,
            query_ids=[x for p in parts for x in p.query_ids],
            edits=[x for p in parts for x in p.edits],
            references=[x for p in parts for x in p.references],
            positives=[x for p in parts for x in p.positives],
            top_ids=[x for p in parts for x in p.top_ids],
            top_scores=stack_ragged([p.top_scores for p in parts]),
            gallery_ids=[x for p in parts for x in p.gallery_ids],
            query_emb=torch.cat([p.query_emb for p in parts]),
            gallery_emb=torch.cat([p.gallery_emb for p in parts]),
            images=Images(
                query=lambda i: owner[i][0].images.query(owner[i][1]),
                gallery=lambda g: next(
                    p.images.gallery(g) for p in parts if g in set(p.gallery_ids)
                ),
            ),
            coverage=sum((p.coverage for p in parts[1:]), parts[0].coverage),
        )
    first.metrics = metrics
    first.conventions = {
        **_search_conventions(s, model),
        "gallery": FASHIONIQ_GALLERIES[s.fashioniq_gallery],
    }
    return first


# --- CIRCO ------------------------------------------------------------------------------------


def circo(
    model,
    tokenizer,
    root,
    split: str = "val",
    image_dir=None,
    out_dir=None,
    settings: EvalSettings | None = None,
) -> Evaluation:
    s = settings or EvalSettings()
    ks = s.ks or KS["circo"]
    check_choice("circo_text", s.circo_text, CIRCO_TEXTS)
    queries, gallery = read_circo(root, split, image_dir)
    if s.circo_text == "concept":
        for q in queries:
            q.caption = CIRCO_TEXTS["concept"].format(
                shared_concept=q.extra["shared_concept"], relative_caption=q.caption
            )
    queries, gallery, coverage, found = _search_images(
        model, tokenizer, queries, gallery, s, max(max(ks), 50), True
    )
    top_ids = found[4]
    metrics: dict = {}
    evaluation = build_evaluation(
        "circo", metrics, queries, found, picture_images(gallery, queries), coverage
    )
    evaluation.conventions = {
        **_search_conventions(s, model),
        "gallery": "reference removed",
        "query_text": CIRCO_TEXTS[s.circo_text],
    }
    if all(not q.targets for q in queries):  # test split: the submission file
        out_dir = Path(out_dir or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"circo_{split}_submission.json"
        path.write_text(
            json.dumps({q.query_id: [int(g) for g in top[:50]] for q, top in zip(queries, top_ids)})
        )
        evaluation.files = [path]
        return evaluation
    ranked = []  # among equal scores the irrelevant first: a tie earns no credit
    for row, scores, q in zip(top_ids, found[3], queries):
        order = pessimistic_order(scores[: len(row)], [g in set(q.targets) for g in row])
        ranked.append([row[j] for j in order])
    for k, v in map_at_k(ranked, [q.targets for q in queries], ks).items():
        metrics[f"mAP@{k}"] = v
    metrics.update(_recall_table(top_ids, found[3], [q.target for q in queries], ks))
    evaluation.conventions["metrics"] = "mAP@K of gt_img_ids; R@K of target_img_id (CoVR)"
    return evaluation


# --- WebVid-CoVR ------------------------------------------------------------------------------


def _shard_images(urls: list[str], sources: list[tuple[str, int]]) -> Images:
    """Report pictures from the shards, read on first use: query row n -> the first frame of its
    own triplet (`sources[n]` = record key, triplet), a target -> its middle frame."""
    queries: dict[tuple[str, int], bytes] = {}
    targets: dict[str, bytes] = {}

    def fill():
        if queries:
            return
        for record in iter_records(urls):
            meta = fmt.record_meta(record)
            picture = fmt.target_picture(record)  # embedded shards keep a thumbnail
            if picture is not None:
                targets[meta["target"]] = picture
            for j in range(len(meta["triplets"])):
                queries[record["__key__"], j] = fmt.query_jpegs(record, j)[0]

    def query(n: int) -> np.ndarray:
        fill()
        return fmt.decode_rgb(queries[tuple(sources[n])])

    def gallery(g: str) -> np.ndarray:
        fill()
        if g not in targets:
            raise KeyError(f"no picture of target {g!r} in the shards")
        return fmt.decode_rgb(targets[g])

    return Images(query=query, gallery=gallery)


def webvid_covr(
    model, tokenizer, shards: ShardSet | str | Path, settings: EvalSettings | None = None
) -> Evaluation:
    """`shards`: a split's shard directory, or the `ShardSet` a training run opened once."""
    from functools import partial

    from eval.retrieval import embed_split, webvid_topk
    from sharding.batch import collate

    s = settings or EvalSettings()
    ks = s.ks or KS["webvid-covr"]
    shards = shards if isinstance(shards, ShardSet) else open_shards(shards)
    check_text_len(model, s.text_len)
    check_embedded(shards.manifest, shards.dir, model)  # precomputed targets: from this model's
    urls = shards.urls
    batch_collate = partial(
        collate,
        tokenizer=tokenizer,
        image_size=model.hf.config.vision_config.image_size,
        max_text_len=s.text_len,
        padding="longest",
        edit_words=model.cfg.edit_words,
        description=model.cfg.description,
        description_tokens=model.cfg.description_tokens,
    )
    emb = embed_split(
        model,
        urls,
        batch_collate,
        s.batch_size,
        s.rank,
        s.world,
        s.progress,
        seed=s.seed,
        reduce=s.reduce,
    )
    scores, top = webvid_topk(emb, max(ks), s.reduce, s.index)
    gallery_ids = emb["gallery_ids"]
    top_ids = [[gallery_ids[j] for j in row] for row in top]
    positives = [gallery_ids[p] for p in emb["positives"]]
    metrics = _recall_table(top_ids, scores, positives, ks)
    _mean_recalls(metrics, ks)
    return Evaluation(
        protocol="webvid-covr",
        metrics=metrics,
        query_ids=[str(i) for i in range(len(positives))],
        edits=emb["edits"],
        references=emb["query_refs"],
        positives=[[p] for p in positives],
        top_ids=top_ids,
        top_scores=scores,
        gallery_ids=gallery_ids,
        query_emb=emb["query"],
        gallery_emb=emb["gallery"],
        images=_shard_images(urls, emb["query_sources"]),
        conventions={
            **_search_conventions(s, model),
            "queries": f"one triplet per target (seed {s.seed})",
            "targets": "pooled tokens re-normalised",
            "gallery": "query's own video removed",
            "frames": packed_frames(shards.manifest),
        },
        coverage=shard_coverage(shards.manifest, len(positives), len(gallery_ids)),
    )


def packed_frames(manifest: dict) -> str:
    """How the shards store frames (a packing setting: the reference saw BGR decoded targets)."""
    packing = manifest.get("config", {})
    fmt_name = packing.get("frame_format", "jpeg")
    stored = f"jpeg q{packing.get('jpeg_quality', 90)}" if fmt_name == "jpeg" else fmt_name
    return f"{stored}, targets {packing.get('target_channels', 'rgb')}"
