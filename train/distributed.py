"""Collectives for global negatives. Every function is the identity on a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (rank order); the local slice keeps its
    autograd history, other ranks' slices are constants. Equal shapes on every rank."""
    rank, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, without gradient."""
    _, size = world()
    if size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)
