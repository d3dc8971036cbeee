"""Batches onto the device DeepSpeed put the model on (it moves the model, not the inputs)."""

from __future__ import annotations

import torch


def pin_memory_for(device) -> bool:
    """Page-locked loader batches only for a CUDA device: the host-to-device copy can then run
    asynchronously (`to_device`) and overlap the previous step's kernels; on CPU it is pure cost."""
    return torch.device(device).type == "cuda"


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`, copied without blocking the host (asynchronous from
    pinned memory; CUDA orders the copy before the kernels that read it); other values as they are."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
