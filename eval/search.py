"""FAISS search over a gallery of (multi-vector) embeddings.

`retrieve` is what every protocol calls. Exact by default (`IndexSpec(kind="flat")`): for
`reduce="mean"` FAISS's flat inner product over the token means is the exact similarity
(mean(q) . mean(t)); for `reduce="max"` (the best of every query-token / target-token pair)
`exact_topk` scores every gallery item in chunks with `eval.similarity` (on the GPU when there is
one). Approximate (`ivf` / `hnsw`, for galleries in the millions): FAISS finds candidates by the
token means and, for `max`, the candidates are re-ranked exactly; a true top-k item outside the
shortlist is then missed, so `eval.run` reports the agreement with the exact search. Excluded
items (the query's own reference) never appear in the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from eval.similarity import similarity

INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass
class IndexSpec:
    kind: str = "flat"  # flat | ivf | hnsw
    nlist: int = 0  # IVF cells; 0 = 4 * sqrt(G)
    nprobe: int = 16  # IVF cells visited per query
    hnsw_m: int = 32  # HNSW graph degree
    ef_search: int = 128  # HNSW search breadth
    gpu: bool = False  # faiss-gpu when installed

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; one of {INDEX_KINDS}")


def _f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(vectors, spec: IndexSpec | None = None) -> faiss.Index:
    """An inner-product index over `(G, D)` vectors."""
    spec = spec or IndexSpec()
    x = _f32(vectors)
    g, d = x.shape
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "ivf":
        nlist = spec.nlist or max(1, min(g // 39, int(4 * math.sqrt(g))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = (
            x
            if g <= 256 * nlist
            else x[np.random.default_rng(0).choice(g, 256 * nlist, replace=False)]
        )
        index.train(train)
        index.nprobe = min(spec.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = spec.ef_search
    if spec.gpu:
        if not gpu_available():
            raise RuntimeError("IndexSpec.gpu=True but faiss has no GPU (install the [gpu] extra)")
        if spec.kind == "hnsw":
            raise ValueError("FAISS has no GPU HNSW index; use flat or ivf on GPU")
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    return index


def search(index: faiss.Index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids), both (Q, k); ids are -1 where the index has fewer than k items."""
    k = min(k, index.ntotal)
    return index.search(_f32(queries), k)


def exact_topk(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    reduce: str = "max",
    exclude: list[list[int]] | None = None,
    pairs: int = 1 << 24,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the whole gallery: `query` (Q, Tq, D) x `gallery` (G, Tg, D) scored by
    `similarity(reduce)` in chunks of about `pairs` token pairs; excluded positions score -inf.
    Returns (scores, ids), both (Q, k), best first."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    nq, tq = query.shape[:2]
    ng, tg = gallery.shape[:2]
    per = max(1, int((pairs / (tq * tg)) ** 0.5))  # a square chunk of queries x gallery items
    pairs_banned = [(row, j) for row, items in enumerate(exclude or []) for j in items]
    ban_rows, ban_cols = torch.tensor(pairs_banned, dtype=torch.long).reshape(-1, 2).T.to(device)
    out_scores, out_ids = [], []
    for q0 in range(0, nq, per):
        q = query[q0 : q0 + per].to(device)
        best_s = torch.full((len(q), 0), float("-inf"), device=device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        for g0 in range(0, ng, per):
            scores = similarity(q, gallery[g0 : g0 + per].to(device), reduce)
            hit = (ban_rows >= q0) & (ban_rows < q0 + len(q)) & (ban_cols >= g0)
            hit &= ban_cols < g0 + scores.shape[1]
            scores[ban_rows[hit] - q0, ban_cols[hit] - g0] = float("-inf")
            ids = torch.arange(g0, g0 + scores.shape[1], device=device).expand_as(scores)
            best_s, best_i = torch.cat([best_s, scores], 1), torch.cat([best_i, ids], 1)
            top = best_s.topk(min(k, best_s.shape[1]), dim=1)  # sorted, best first
            best_s, best_i = top.values, best_i.gather(1, top.indices)
        out_scores.append(best_s.cpu())
        out_ids.append(best_i.cpu())
    return torch.cat(out_scores).numpy(), torch.cat(out_ids).numpy()


def retrieve(
    query,
    gallery,
    k: int,
    reduce: str = "mean",
    exclude: list[list[int]] | None = None,
    spec: IndexSpec | None = None,
    candidates: int = 200,
    index: faiss.Index | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery positions for each query. `query` (Q, Tq, D), `gallery` (G, Tg, D) tokens
    (or (Q, D) / (G, D) vectors); `exclude[i]` lists positions query i must not retrieve.
    Returns (scores, ids), both (Q, k'), k' = min(k, G - most excluded); rows sorted by score.
    `max` with a flat spec is exact; with ivf / hnsw FAISS shortlists `candidates` by the token
    means and only those are re-ranked (approximate)."""
    query, gallery = torch.as_tensor(query).float(), torch.as_tensor(gallery).float()
    if query.dim() == 2:
        query = query[:, None]
    if gallery.dim() == 2:
        gallery = gallery[:, None]
    if reduce not in ("mean", "max"):
        raise ValueError(f"unknown reduce {reduce!r} (mean or max)")
    g = gallery.shape[0]
    most_excluded = max((len(e) for e in exclude), default=0) if exclude else 0
    k = min(k, g - most_excluded)
    if reduce == "max" and (spec is None or spec.kind == "flat") and index is None:
        return exact_topk(query, gallery, k, "max", exclude)
    q_vec, g_vec = query.mean(1), gallery.mean(1)
    if index is None:
        index = build_index(g_vec, spec)
    want = k + most_excluded
    if reduce == "max":
        want = min(g, max(want, candidates))
    scores, ids = search(index, q_vec, want)
    if reduce == "max":  # exact re-ranking of the shortlist with the all-pairs max
        cand = torch.from_numpy(ids.clip(min=0)).long()
        tokens = gallery[cand]  # (Q, C, Tg, D)
        exact = torch.einsum("qsd,qctd->qcst", query, tokens).flatten(2).amax(-1)
        scores = np.where(ids >= 0, exact.numpy(), -np.inf).astype(np.float32)
    if exclude:
        for row, banned in enumerate(exclude):
            if banned:
                scores[row, np.isin(ids[row], banned)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def ranks_from_topk(ids: np.ndarray, positives, scores: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each positive in its row of top-k ids (a huge number when absent). With `scores`,
    ranks are pessimistic under ties as in `eval.metrics.positive_ranks`."""
    ids = np.asarray(ids)
    hit = ids == np.asarray(positives, dtype=ids.dtype)[:, None]
    found = hit.any(1)
    first = hit.argmax(1)
    if scores is not None:
        scores = np.asarray(scores)
        own = scores[np.arange(len(first)), first][:, None]
        first = (scores >= own).sum(1) - 1
    return np.where(found, first, np.iinfo(np.int64).max)


def recall_from_topk(
    ids: np.ndarray, positives, ks=(1, 5, 10, 50), scores=None
) -> dict[int, float]:
    """{k: percent} from top-k lists; a list shorter than k must hold every candidate (a gallery
    smaller than k)."""
    ranks = ranks_from_topk(ids, positives, scores)
    return {k: 100.0 * float((ranks < k).mean()) for k in ks}


def topk_agreement(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int = 10) -> float:
    """Percent of the exact top-k an approximate search also returns in its top-k."""
    hits = [len(set(a[:k]) & set(e[:k])) for e, a in zip(exact_ids, approx_ids)]
    return 100.0 * float(np.sum(hits)) / (k * len(hits))
