"""Non-finite numbers never reach the weights, a checkpoint or an export.

A NaN / Inf loss (a learning rate that blew the weights up, a corrupt embedded record) is caught
at the micro-batch it happens, before its backward: every rank agrees (one CPU all-reduce; the
check reads the loss, one device sync per micro-batch) and that micro-batch is skipped (no
backward, no optimizer step), named and counted. After `train.nonfinite_limit` skips the job
stops with one line. Before every checkpoint and the export the trainable weights are checked:
a non-finite one is refused, named, and not saved. (The queue keeps a non-finite target row as
an empty slot: `train.queue`.)
"""

from __future__ import annotations

import logging

import torch

from train.distributed import max_over_ranks

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced NaN / Inf beyond what it may skip; nothing non-finite was saved."""


def finite_loss(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (collective)."""
    return not max_over_ranks(int(not torch.isfinite(loss.detach()).all()))


def skip_nonfinite(skipped: int, limit: int, step: int, keys: list[str]) -> int:
    """Count one skipped micro-batch (at optimizer step `step` + 1, of records `keys`); raise
    once more than `limit` were skipped. Returns the new count."""
    skipped += 1
    shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
    where = f"at step {step + 1}, records {shown}"
    if skipped > limit:
        raise NonFiniteError(
            f"loss NaN / Inf in {skipped} micro-batches (train.nonfinite_limit={limit}), the "
            f"last {where}: a learning rate too high, or corrupt records; nothing non-finite "
            f"was saved"
        )
    log.warning("loss NaN / Inf %s: micro-batch skipped (%d of at most %d)", where, skipped, limit)
    return skipped


def check_finite_weights(module: torch.nn.Module, what: str) -> None:
    """Raise `NonFiniteError` naming the first trainable parameter that is not finite on any
    rank (ZeRO-3: each rank checks its partition). Collective."""
    params = [
        (n, getattr(p, "ds_tensor", p)) for n, p in module.named_parameters() if p.requires_grad
    ]
    params = [(n, t) for n, t in params if t.numel() and t.is_floating_point()]
    ok = torch.stack([torch.isfinite(t).all() for _, t in params]) if params else None
    bad = ok is not None and not bool(ok.all())
    if not max_over_ranks(int(bad)):
        return
    name = next((n for (n, _), good in zip(params, ok.tolist()) if not good), "?") if bad else "?"
    raise NonFiniteError(
        f"{what}: the weights are not finite (parameter {name}{'' if bad else ' on another rank'}); "
        "not saved. The last complete checkpoint is kept; a learning rate too high?"
    )
