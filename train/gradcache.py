"""The gradient cache (Gao et al. 2021): a contrastive loss over a per-rank batch larger than
activation memory allows, with the same gradients as the batch in one piece.

1. Embed the batch chunk by chunk without the autograd graph, remembering each chunk's RNG state.
2. Compute the loss once over the whole global batch (gathered across ranks, plus the queue) and
   its gradient with respect to this rank's embeddings (B x D numbers: small).
3. Embed each chunk again, with its graph and the RNG state of step 1 (the same dropout masks),
   and back-propagate its rows of the cached gradient: backward(sum(embedding * gradient)).

The chain rule makes the sum of the chunks' parameter gradients the whole batch's gradient.
Activation memory follows the chunk; the price is a second forward of what has a gradient (the
query side; the target side too when targets are encoded from frames by a trainable encoder).
"""

from __future__ import annotations

import torch

from configs.schema import LossConfig
from train.objective import Objective, contrast_ids
from train.queue import MomentumEncoder, TargetQueue


def chunked_backward(
    engine,
    batch: dict,
    objective: Objective,
    loss_cfg: LossConfig,
    chunk_size: int,
    queue: TargetQueue | None = None,
    momentum: MomentumEncoder | None = None,
    finite=None,
) -> tuple[torch.Tensor, dict | None]:
    """Forward and backward of one micro-batch in chunks of `chunk_size` samples through the
    DeepSpeed `engine`; gradients accumulate for the caller's one `engine.step()`. Returns the
    (detached) loss and the objective's metrics; metrics None, and no backward, when
    `finite(loss)` says the loss is not finite."""
    n = batch["target_ids"].shape[0]
    spans = [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    device = torch.device(engine.device)

    states, parts = [], []
    with torch.no_grad():
        for span in spans:
            states.append(_rng_state(device))
            rows = _rows(batch, span)
            parts.append(
                objective.embed(engine, rows, loss_cfg, momentum if queue is not None else None)
            )
    emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    leaves = {
        k: v.requires_grad_()
        for k, v in emb.items()
        if v.is_floating_point() and k != "queue_entries"
    }
    loss, metrics = objective.contrast(
        emb, contrast_ids(batch, loss_cfg), loss_cfg, engine.cfg.reduce, queue
    )
    if finite is not None and not finite(loss):
        return loss.detach(), None
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    cached = {k: g for k, g in zip(leaves, grads) if g is not None}

    after = _rng_state(device)
    # the first chunk embeds everything, the others only what has a gradient: frozen targets
    # are not encoded twice (they run in eval mode, so skipping them draws no dropout mask less)
    keys = None
    for i, (span, state) in enumerate(zip(spans, states)):
        # DeepSpeed treats each backward as a micro-batch: only the last chunk may be the
        # gradient-accumulation boundary (None: the engine's own count decides, as unchunked);
        # before it, ZeRO-0/1 must not reduce and ZeRO-2/3 must accumulate, not overwrite
        engine.set_gradient_accumulation_boundary(None if i == len(spans) - 1 else False)
        _set_rng_state(state, device)
        part = objective.embed(engine, _rows(batch, span), loss_cfg, keys=keys)
        if keys is None:
            keys = {k for k, v in part.items() if v.requires_grad and k in cached}
        terms = [(part[k] * g[span]).sum() for k, g in cached.items() if k in keys]
        if not terms:
            raise RuntimeError("gradient cache: no embedding has a gradient (nothing to train?)")
        engine.backward(torch.stack(terms).sum())
    _set_rng_state(after, device)
    return loss.detach(), metrics


def _rows(batch: dict, span: slice) -> dict:
    return {k: v[span] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
