"""Retrieval metrics (docs/METHOD.md §5).

Ranks are pessimistic under ties: the positive's rank counts every other item scoring at least
as high, so a model that scores everything equally gets no credit.
"""

from __future__ import annotations

import numpy as np
import torch


def positive_ranks(scores: torch.Tensor, positives: torch.Tensor | list[int]) -> torch.Tensor:
    """0-based rank of each query's positive in its row of the (Q, G) score matrix."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    positives = torch.as_tensor(positives, dtype=torch.long)
    rows = torch.arange(scores.shape[0])
    pos = scores[rows, positives][:, None]
    return (scores >= pos).sum(1) - 1


def item_ranks(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of every item of one (N,) score vector, each as `positive_ranks` ranks a
    positive (a CIRR subset, where soft labels credit any member)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return (scores[None, :] >= scores[:, None]).sum(1) - 1


def recall_at_k(scores, positives, ks=(1, 5, 10, 50)) -> dict[int, float]:
    """{k: percent of queries whose positive ranks within the top k}."""
    ranks = positive_ranks(scores, positives)
    return {k: 100.0 * (ranks < k).float().mean().item() for k in ks}


def map_at_k(ranked_ids, relevant_ids, ks=(5, 10, 25, 50)) -> dict[int, float]:
    """mAP@K in percent as CIRCO's and TF-CoVR's official code compute it: AP@K =
    sum_{r<=K} P(r) rel(r) / min(K, len(relevant)). Every ranked item that is relevant counts
    (a gallery that holds a clip twice can credit it twice), and the denominator counts the
    relevant list as given: a target missing from the gallery, or listed twice, is still
    counted and can never be found."""
    out = {}
    for k in ks:
        aps = []
        for ranked, relevant in zip(ranked_ids, relevant_ids):
            wanted = set(relevant)
            hits, total = 0, 0.0
            for r, item in enumerate(list(ranked)[:k], 1):
                if item in wanted:
                    hits += 1
                    total += hits / r
            aps.append(total / min(k, len(relevant)) if relevant else 0.0)
        out[k] = 100.0 * sum(aps) / max(1, len(aps))
    return out


def recall_any_at_k(ranked_ids, relevant_ids, ks=(1, 5, 10)) -> dict[int, float]:
    """{k: percent of queries with at least one relevant item in their top k} (EgoCVR's rule for
    queries with several targets; one target: R@K)."""
    out = {}
    for k in ks:
        hits = [bool(set(list(r)[:k]) & set(rel)) for r, rel in zip(ranked_ids, relevant_ids)]
        out[k] = 100.0 * sum(hits) / max(1, len(hits))
    return out


def pessimistic_order(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Positions by descending score; among equal scores the irrelevant ones first, so a tie
    never earns credit (as `positive_ranks`), whatever the gallery's order."""
    return np.lexsort((np.asarray(relevant, dtype=bool), -np.asarray(scores)))
