"""HN-NCE (docs/METHOD.md §3) and the CoVR objective built on it.

For row i of S = q t^T / tau (query -> target):
    w_ij = (N_i) exp(beta S_ij) / sum_{k != i, valid} exp(beta S_ik)  for valid negatives j,
    w_ii = alpha,   L_i = log sum_j w_ij exp(S_ij) - S_ii
with N_i the number of valid negatives of row i (B - 1 without a queue), and the same over the
columns for target -> query. Weights are constants (no gradient). beta = 0 gives InfoNCE.
The public reference code normalises the q->t weights by the wrong axis; this follows the formula.
"""

from __future__ import annotations

import torch


def _directional(
    logits: torch.Tensor, alpha: float, beta: float, negatives: torch.Tensor
) -> torch.Tensor:
    """Mean over rows of the HN-NCE term; positive of row i is column i; `negatives` (bool,
    same shape) marks the valid negatives of each row."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    positive = logits[rows, rows]
    with torch.no_grad():  # log w_ij, in log space for stability
        count = negatives.sum(1, keepdim=True).clamp_min(1)
        masked = (beta * logits).masked_fill(~negatives, float("-inf"))
        log_w = torch.log_softmax(masked, dim=1) + torch.log(count.to(logits.dtype))
        log_w = torch.where(negatives, log_w, torch.full_like(log_w, float("-inf")))
        log_w[rows, rows] = torch.log(torch.tensor(alpha, dtype=logits.dtype))
    return (torch.logsumexp(logits + log_w, dim=1) - positive).mean()


def hn_nce_from_similarity(
    sim: torch.Tensor,
    temperature: float = 0.07,
    alpha: float = 1.0,
    beta: float = 0.5,
    extra_negatives: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Both directions of HN-NCE from a (B, B) similarity matrix (positives on the diagonal).
    `extra_negatives` (B, K): more target columns for the query->target direction only (the
    queue); `extra_mask` (B, K) bool marks which of them are valid negatives."""
    b = sim.shape[0]
    logits = sim / temperature
    in_batch = ~torch.eye(b, dtype=torch.bool, device=sim.device)
    q2t_logits, q2t_neg = logits, in_batch
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        q2t_logits = torch.cat([logits, extra_negatives / temperature], dim=1)
        mask = (
            extra_mask
            if extra_mask is not None
            else torch.ones_like(extra_negatives, dtype=torch.bool)
        )
        q2t_neg = torch.cat([in_batch, mask], dim=1)
    return _directional(q2t_logits, alpha, beta, q2t_neg) + _directional(
        logits.t(), alpha, beta, in_batch
    )


def hn_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.07,
    alpha: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """HN-NCE on (B, D) embeddings (L2-normalised by the caller), both directions summed."""
    return hn_nce_from_similarity(query @ target.t(), temperature, alpha, beta)
