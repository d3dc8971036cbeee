"""HN-NCE (docs/METHOD.md §3) and the CoVR objective built on it.

For row i of S = q t^T / tau (query -> target):
    w_ij = (N_i) exp(beta S_ij) / sum_{k != i, valid} exp(beta S_ik)  for valid negatives j,
    w_ii = alpha,   L_i = log sum_j w_ij exp(S_ij) - S_ii
with N_i the number of valid negatives of row i (B - 1 without a queue), and the same over the
columns for target -> query. Weights are constants (no gradient). beta = 0 gives InfoNCE.

Several positives per query (`positives`, `loss.positives=all`: every valid target of a query,
e.g. TF-CoVR's, is a positive and never a negative): with P_i the positive columns of row i,
    L_i = log (sum_{p in P_i} alpha exp(S_ip) + sum_{n not in P_i} w_in exp(S_in))
          - log sum_{p in P_i} exp(S_ip),
the weights w over the negatives only. With P_i = {i} this is the formula above exactly.

`variant="reference"` reproduces the public reference code instead (value and gradient), for
comparing with its runs: its q->t weight w_ij is normalised by row j's sum (a (B, B) matrix divided
by a length-B vector broadcasts along the wrong axis) and neither direction's weights are detached.
It has no queue, so it takes no extra negatives.
"""

from __future__ import annotations

import torch


def _directional(
    logits: torch.Tensor,
    alpha: float,
    beta: float,
    negatives: torch.Tensor,
    positives: torch.Tensor,
) -> torch.Tensor:
    """Mean over rows of the HN-NCE term; `negatives` and `positives` (bool, same shape, never
    both) mark each row's valid negatives and its positives (column i of row i at least)."""
    with torch.no_grad():  # log w_ij, in log space for stability
        count = negatives.sum(1, keepdim=True).clamp_min(1)
        masked = (beta * logits).masked_fill(~negatives, float("-inf"))
        log_w = torch.log_softmax(masked, dim=1) + torch.log(count.to(logits.dtype))
        log_w = torch.where(negatives, log_w, torch.full_like(log_w, float("-inf")))
        log_alpha = torch.log(torch.tensor(alpha, dtype=logits.dtype, device=logits.device))
        log_w = torch.where(positives, log_alpha, log_w)
    positive = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (torch.logsumexp(logits + log_w, dim=1) - positive).mean()


VARIANTS = ("corrected", "reference")


def _reference(logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Both directions as the reference code computes them (see the module docstring)."""
    b = logits.shape[0]
    rows = torch.arange(b, device=logits.device)
    positive = logits[rows, rows]
    e = torch.exp(beta * logits)
    own = e[rows, rows]
    w_q2t = (b - 1) * e / (e.sum(1) - own)  # divides column j by row j's sum: the slip
    w_t2q = (b - 1) * e / (e.sum(0) - own)  # column j by column j's sum: right
    diagonal = torch.eye(b, dtype=torch.bool, device=logits.device)
    w_q2t = w_q2t.masked_fill(diagonal, alpha)
    w_t2q = w_t2q.masked_fill(diagonal, alpha)
    q2t = torch.log((torch.exp(logits) * w_q2t).sum(1)) - positive
    t2q = torch.log((torch.exp(logits) * w_t2q).sum(0)) - positive
    return q2t.mean() + t2q.mean()


def hn_nce_from_similarity(
    sim: torch.Tensor,
    temperature: float = 0.07,
    alpha: float = 1.0,
    beta: float = 0.5,
    extra_negatives: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    variant: str = "corrected",
    positives: torch.Tensor | None = None,
    extra_positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Both directions of HN-NCE from a (B, B) similarity matrix (positives on the diagonal).
    `extra_negatives` (B, K): more target columns for the query->target direction only (the
    queue); `extra_mask` (B, K) bool marks which of them are valid negatives. `positives`
    (B, B) / `extra_positives` (B, K) bool: more positives than the diagonal (module doc).
    `variant`: one of `VARIANTS` (module docstring)."""
    b = sim.shape[0]
    logits = sim / temperature
    if variant == "reference":
        if extra_negatives is not None and extra_negatives.shape[1] > 0:
            raise ValueError("the reference HN-NCE has no queue: extra negatives need 'corrected'")
        if positives is not None or extra_positives is not None:
            raise ValueError("the reference HN-NCE has one positive: several need 'corrected'")
        return _reference(logits.float(), alpha, beta)
    if variant != "corrected":
        raise ValueError(f"HN-NCE variant must be one of {VARIANTS}, got {variant!r}")
    pos = torch.eye(b, dtype=torch.bool, device=sim.device)
    if positives is not None:
        pos = pos | positives
    in_batch = ~pos
    q2t_logits, q2t_neg, q2t_pos = logits, in_batch, pos
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        q2t_logits = torch.cat([logits, extra_negatives / temperature], dim=1)
        mask = (
            extra_mask
            if extra_mask is not None
            else torch.ones_like(extra_negatives, dtype=torch.bool)
        )
        extra_pos = extra_positives if extra_positives is not None else torch.zeros_like(mask)
        q2t_neg = torch.cat([in_batch, mask & ~extra_pos], dim=1)
        q2t_pos = torch.cat([pos, extra_pos], dim=1)
    return _directional(q2t_logits, alpha, beta, q2t_neg, q2t_pos) + _directional(
        logits.t(), alpha, beta, in_batch.t(), pos.t()
    )


def hn_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.07,
    alpha: float = 1.0,
    beta: float = 0.5,
    variant: str = "corrected",
) -> torch.Tensor:
    """HN-NCE on (B, D) embeddings (L2-normalised by the caller), both directions summed."""
    return hn_nce_from_similarity(query @ target.t(), temperature, alpha, beta, variant=variant)
