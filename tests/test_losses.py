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


def reference_formula(s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The reference code's HN-NCE on logits `s` (B, B), element by element, with autograd:
    q->t weight (i, j) normalised by the negatives of row j, t->q by those of column j."""
    b = s.shape[0]

    def weight(i, j, norm):
        if i == j:
            return torch.tensor(alpha, dtype=s.dtype)
        return (b - 1) * torch.exp(beta * s[i, j]) / norm

    row = [sum(torch.exp(beta * s[j, k]) for k in range(b) if k != j) for j in range(b)]
    col = [sum(torch.exp(beta * s[k, j]) for k in range(b) if k != j) for j in range(b)]
    q2t = sum(
        torch.log(sum(weight(i, j, row[j]) * torch.exp(s[i, j]) for j in range(b))) - s[i, i]
        for i in range(b)
    )
    t2q = sum(
        torch.log(sum(weight(i, j, col[j]) * torch.exp(s[i, j]) for i in range(b))) - s[j, j]
        for j in range(b)
    )
    return (q2t + t2q) / b


def test_reference_variant_reproduces_the_reference_value_and_gradient():
    q, t = unit(4, 8, seed=10), unit(4, 8, seed=11)
    q64 = q.double().requires_grad_()
    expected = reference_formula(q64 @ t.double().t() / 0.07, 1.0, 0.5)
    expected.backward()

    q_ref = q.clone().requires_grad_()
    got = hn_nce(q_ref, t, variant="reference")
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(q_ref.grad.double(), q64.grad, atol=1e-4)

    # the case is one where the variants differ, in value and in gradient
    q_cor = q.clone().requires_grad_()
    corrected = hn_nce(q_cor, t)
    corrected.backward()
    assert corrected.item() == pytest.approx(formula(q @ t.t()), rel=1e-5)
    assert abs(corrected.item() - got.item()) > 1e-3
    assert (q_cor.grad - q_ref.grad).abs().max() > 1e-3


def test_reference_variant_refuses_a_queue_and_unknown_variants():
    q, t, extra = unit(3, 8, seed=12), unit(3, 8, seed=13), unit(2, 8, seed=14)
    with pytest.raises(ValueError, match="no queue"):
        hn_nce_from_similarity(q @ t.t(), extra_negatives=q @ extra.t(), variant="reference")
    with pytest.raises(ValueError, match="variant"):
        hn_nce(q, t, variant="lavis")


# --- several positives per query (loss.positives=all) -------------------------------------------


def multi_formula(sim, pos, tau=0.07, alpha=1.0, beta=0.5, neg=None):
    """The module's multi-positive formula loop by loop (float64): rows of `sim` (B, N >= B),
    `pos[i][j]` its positives; `neg[i][j]` valid negatives (default: every non-positive)."""
    s = sim.double() / tau
    b, n = s.shape
    neg = neg or [[not pos[i][j] for j in range(n)] for i in range(b)]

    def direction(s, pos, neg):
        total = 0.0
        for i in range(s.shape[0]):
            ps = [j for j in range(s.shape[1]) if pos[i][j]]
            ns = [j for j in range(s.shape[1]) if neg[i][j] and not pos[i][j]]
            den = sum(math.exp(beta * s[i, k]) for k in ns)
            acc = sum(alpha * math.exp(s[i, p]) for p in ps)
            acc += sum(len(ns) * math.exp(beta * s[i, j]) / den * math.exp(s[i, j]) for j in ns)
            total += math.log(acc) - math.log(sum(math.exp(s[i, p]) for p in ps))
        return total / s.shape[0]

    square = [[pos[j][i] for j in range(b)] for i in range(b)]  # target -> query
    return direction(s, pos, neg) + direction(
        s[:, :b].t(), square, [[not x for x in r] for r in square]
    )


def test_one_positive_each_is_todays_hn_nce_exactly():
    sim = unit(6, 8, seed=3) @ unit(6, 8, seed=4).t()
    extra, mask = unit(6, 8, seed=5) @ unit(9, 8, seed=6).t(), torch.rand(6, 9) > 0.3
    eye = torch.eye(6, dtype=torch.bool)
    for args in ((), (extra, mask)):
        plain = hn_nce_from_similarity(sim, 0.1, 0.8, 0.5, *args)
        one = hn_nce_from_similarity(
            sim,
            0.1,
            0.8,
            0.5,
            *(args or (None, None)),
            "corrected",
            eye,
            torch.zeros(6, 9).bool() if args else None,
        )
        assert torch.equal(plain, one)


def test_several_positives_match_the_formula_with_the_queue():
    b, k = 5, 4
    sim = unit(b, 8, seed=7) @ unit(b, 8, seed=8).t()
    extra = unit(b, 8, seed=7) @ unit(k, 8, seed=9).t()
    pos = torch.eye(b, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = pos[3, 4] = True  # 0 and 1 share targets; 4's target valid for 3
    extra_pos = torch.zeros(b, k, dtype=torch.bool)
    extra_pos[2, 0] = True  # a queued copy of a valid target of row 2
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[4, 3] = False  # not a valid negative (its own target id)
    got = hn_nce_from_similarity(
        sim, 0.1, 0.9, 0.7, extra, mask, "corrected", pos, extra_pos
    ).item()
    full_pos = torch.cat([pos, extra_pos], 1).tolist()
    full_neg = torch.cat([~pos, mask & ~extra_pos], 1).tolist()
    want = multi_formula(torch.cat([sim, extra], 1), full_pos, 0.1, 0.9, 0.7, full_neg)
    assert got == pytest.approx(want, rel=1e-5)


def test_a_valid_target_stops_being_a_negative():
    # rows 0 and 1 have the same valid targets: as negatives they are pushed apart
    q = unit(4, 8, seed=10)
    t = unit(4, 8, seed=11)
    t.data[1] = q.data[0]  # row 0's query is closest to row 1's target
    pos = torch.eye(4, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    one = hn_nce_from_similarity(q @ t.t(), 0.1)
    both = hn_nce_from_similarity(q @ t.t(), 0.1, positives=pos)
    assert both < one  # the close valid target now helps instead of hurting


def test_several_positives_need_the_corrected_variant():
    sim = torch.eye(3)
    with pytest.raises(ValueError, match="one positive"):
        hn_nce_from_similarity(sim, variant="reference", positives=torch.eye(3).bool())
    from configs.schema import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.positives"):
        load_config(None, ["loss.positives=all", "loss.hn_nce=reference"])
