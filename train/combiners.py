"""Combiners: how the composed query embedding is formed (docs/METHOD.md §4).

Inputs: f, the fusion (joint video+text) query tokens (B, Q, D) normalised per token;
i, the image-only query embedding (B, D); t, the text-only edit embedding (B, D).
Output: (query tokens (B, Q', D), weights (B, 3) or None for logging).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COMBINERS = ("fusion", "avg", "mlp", "text", "image")  # text / image: unimodal ablations


class FusionCombiner(nn.Module):
    """The model's own joint encoding, unchanged (the reference)."""

    needs_fusion, needs_unimodal = True, False

    def forward(self, f, i=None, t=None):
        return f, None


class TextOnly(nn.Module):
    """Ablation: the edit text alone (no video)."""

    needs_fusion, needs_unimodal = False, True

    def forward(self, f, i, t):
        return t[:, None], None


class ImageOnly(nn.Module):
    """Ablation: the query frame alone (no edit)."""

    needs_fusion, needs_unimodal = False, True

    def forward(self, f, i, t):
        return i[:, None], None


class AverageCombiner(nn.Module):
    """normalize((f + i + t) / 3), with f the mean of its tokens."""

    needs_fusion, needs_unimodal = True, True

    def forward(self, f, i, t):
        return F.normalize((f.mean(1) + i + t) / 3, dim=-1)[:, None], None


class MLPCombiner(nn.Module):
    """w = softmax(MLP([f; i; t])), output normalize(w0 f + w1 i + w2 t)."""

    needs_fusion, needs_unimodal = True, True

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, f, i, t):
        f = f.mean(1)
        w = torch.softmax(self.mlp(torch.cat([f, i, t], dim=-1)), dim=-1)
        out = w[:, 0:1] * f + w[:, 1:2] * i + w[:, 2:3] * t
        return F.normalize(out, dim=-1)[:, None], w


def build_combiner(name: str, dim: int) -> nn.Module:
    if name == "fusion":
        return FusionCombiner()
    if name == "avg":
        return AverageCombiner()
    if name == "mlp":
        return MLPCombiner(dim)
    if name == "text":
        return TextOnly()
    if name == "image":
        return ImageOnly()
    raise ValueError(f"unknown combiner {name!r}; one of {COMBINERS}")
