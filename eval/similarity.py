"""The similarity of composed queries and targets: one rule for the training loss, retrieval and
explanations (training imports it from here)."""

from __future__ import annotations

import torch


def similarity(query: torch.Tensor, target: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """(Bq, Q, D) x (Bt, T, D) -> (Bq, Bt). The query tokens are averaged; `mean` averages the
    target tokens too (the training and WebVid-CoVR rule), `max` takes the best target token
    (the reference's CIRR rule)."""
    q = query.mean(1)
    if reduce == "mean":
        return q @ target.mean(1).t()
    if reduce == "max":
        return torch.einsum("bd,ntd->bnt", q, target).amax(-1)
    raise ValueError(f"unknown reduce {reduce!r} (mean or max)")
