"""The similarity of composed queries and targets: one rule for the training loss, retrieval and
explanations (training imports it from here)."""

from __future__ import annotations

import torch


def similarity(query: torch.Tensor, target: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """(Bq, Q, D) x (Bt, T, D) -> (Bq, Bt). `mean`: token means compared (the training and
    WebVid-CoVR rule); `max`: the best of every (query token, target token) pair (the reference's
    CIRR rule for BLIP-2, src/test/blip2/cirr_val.py). `max` holds a (Bq, Bt, Q, T) product:
    retrieval calls it on chunks (eval.search.exact_topk)."""
    if reduce == "mean":
        return query.mean(1) @ target.mean(1).t()
    if reduce == "max":
        return torch.einsum("bqd,ntd->bnqt", query, target).flatten(2).amax(-1)
    raise ValueError(f"unknown reduce {reduce!r} (mean or max)")
