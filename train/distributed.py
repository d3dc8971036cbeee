"""Collectives for global negatives. Every function is the identity on a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_cpu_group = None


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (collective; any picklable object): what one rank
    decided (a lock refusal, a checkpoint tag, a run id) becomes every rank's."""
    if world()[1] == 1:
        return value
    said = [value]
    dist.broadcast_object_list(said, src=0)
    return said[0]


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value` (collective): a CPU all-reduce over gloo, beside NCCL
    too, so that agreeing on a flag costs no device sync."""
    global _cpu_group
    if world()[1] == 1:
        return value
    if _cpu_group is None:  # the default group when it is gloo; every rank creates it at once
        _cpu_group = (
            dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        )
    out = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=_cpu_group)
    return int(out.item())


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (rank order). Equal shapes on every rank.

    Every rank computes the same loss over the gathered batch, so the gradient the reference
    sums back from all ranks (Fabric's `all_gather(sync_grads=True)`) is world x this rank's
    own: the local slice carries that gradient without a second collective, and after the
    engine averages over ranks the update equals one process's on the global batch."""
    rank, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = _ScaleGrad.apply(x, float(size))
    return torch.cat(parts)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, without gradient."""
    _, size = world()
    if size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)
