import math

import pytest
import torch
import torch.nn.functional as F

from train.losses import hn_nce, hn_nce_from_similarity


def formula(sim, tau=0.07, alpha=1.0, beta=0.5, valid=None):
    """docs/METHOD.md §3 written out loop by loop (float64), query->target rows of `sim`
    (B, N >= B); `valid[i][j]` marks negatives; plus target->query over the first B columns."""
    sim = sim.double() / tau
    b, n = sim.shape

    def direction(s, valid):
        total = 0.0
        for i in range(s.shape[0]):
            negs = [j for j in range(s.shape[1]) if j != i and valid[i][j]]
            den = sum(math.exp(beta * s[i, k]) for k in negs)
            acc = alpha * math.exp(s[i, i])
            for j in negs:
                acc += len(negs) * math.exp(beta * s[i, j]) / den * math.exp(s[i, j])
            total += math.log(acc) - s[i, i]
        return total / s.shape[0]

    valid = valid if valid is not None else [[True] * n for _ in range(b)]
    square = [[True] * b for _ in range(b)]
    return direction(sim, valid) + direction(sim[:, :b].t(), square)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.7, 1.3), (1.0, 0.0)])
def test_hn_nce_matches_the_formula(alpha, beta):
    q, t = unit(7, 16, seed=1), unit(7, 16, seed=2)
    got = hn_nce(q, t, temperature=0.1, alpha=alpha, beta=beta).item()
    assert got == pytest.approx(formula(q @ t.t(), 0.1, alpha, beta), rel=1e-5)


def test_beta_zero_is_infonce():
    q, t = unit(9, 8, seed=3), unit(9, 8, seed=4)
    logits = q @ t.t() / 0.07
    labels = torch.arange(9)
    infonce = F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)
    assert hn_nce(q, t, beta=0.0).item() == pytest.approx(infonce.item(), rel=1e-6)
    assert hn_nce(q, t, beta=0.5).item() != pytest.approx(infonce.item(), rel=1e-3)


def test_queue_negatives_with_masked_entries_match_the_formula():
    q, t, extra = unit(5, 8, seed=5), unit(5, 8, seed=6), unit(6, 8, seed=7)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[0, 2] = mask[3, 0] = mask[3, 5] = False  # same target id: not a negative
    got = hn_nce_from_similarity(q @ t.t(), 0.07, 1.0, 0.5, q @ extra.t(), mask).item()
    valid = [[True] * 5 + mask[i].tolist() for i in range(5)]
    full = torch.cat([q @ t.t(), q @ extra.t()], dim=1)
    assert got == pytest.approx(formula(full, valid=valid), rel=1e-5)


def test_weights_carry_no_gradient():
    q = unit(6, 8, seed=8).requires_grad_()
    t = unit(6, 8, seed=9)
    hn_nce(q, t, beta=0.5).backward()
    # reference gradient: the same loss with the weights computed from detached similarities
    q2 = q.detach().clone().requires_grad_()
    s = q2 @ t.t() / 0.07
    loss = 0
    for logits in (s, s.t()):
        eye = torch.eye(6, dtype=torch.bool)
        w = torch.softmax((0.5 * logits.detach()).masked_fill(eye, float("-inf")), 1) * 5
        w = w.masked_fill(eye, 1.0)
        loss = loss + (torch.logsumexp(logits + w.log(), 1) - logits.diag()).mean()
    loss.backward()
    assert torch.allclose(q.grad, q2.grad, atol=1e-5)
