"""The `meta` device standing in for a GPU in CPU-only CI.

A model moved to `meta` computes shapes only and refuses CPU operands ("Tensor on device cpu is
not on the expected device meta!"), which is what a CUDA device mismatch looks like. What a meta
tensor cannot do is give values back to the host: `MetaStandsForGPU` answers those calls (`.cpu()`,
`.numpy()`, `.tolist()`, `.item()`, `bool()`, `int()`, `float()`) with zeros or ones of the
right shape, so a whole evaluation or embed job runs to its end and any input left on the CPU
stops it.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ONE = (
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
)
_HOST = (torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__)


def _to_cpu(args, kwargs) -> bool:
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


class MetaStandsForGPU(TorchFunctionMode):
    """Within it, meta tensors hand placeholder values to the host (counts of meta-tensor reads in
    `host_reads`, so a test can tell the model really ran on `meta`)."""

    def __init__(self):
        super().__init__()
        self.host_reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if t is not None and t.device.type == "meta":
            if func in _ONE:
                self.host_reads += 1
                return func(torch.ones((), dtype=t.dtype))
            if func in _HOST or (func is torch.Tensor.to and _to_cpu(args, kwargs)):
                self.host_reads += 1
                zeros = torch.zeros(t.shape, dtype=t.dtype)
                if func is torch.Tensor.cpu or func is torch.Tensor.to:
                    return zeros
                return func(zeros, *args[1:], **kwargs)
        return func(*args, **kwargs)
