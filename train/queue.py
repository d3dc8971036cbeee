"""Hard-negative queue of target embeddings and the momentum (EMA) copy that feeds it when the
target encoder is trainable.

The queue is filled with the *global* batch each step (gathered from all ranks in rank order), so
every rank holds the same queue. It is part of a checkpoint (`state_dict`).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


class TargetQueue:
    """FIFO of `size` target embeddings (any feature shape) with their integer target ids."""

    def __init__(
        self, size: int, feature_shape: tuple[int, ...], dtype=torch.float32, device="cpu"
    ):
        self.size = size
        self.features = torch.zeros((size, *feature_shape), dtype=dtype, device=device)
        self.ids = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0  # next slot to write
        self.filled = 0

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor) -> None:
        n = features.shape[0]
        if n >= self.size:  # only the newest `size` survive
            features, ids, n = features[-self.size :], ids[-self.size :], self.size
        slots = (self.ptr + torch.arange(n, device=self.ids.device)) % self.size
        features = features.detach().to(self.features)
        # a non-finite row (a corrupt record) would make every later loss NaN: kept as an
        # empty slot (id -1, never a negative), on the device, without a sync
        finite = torch.isfinite(features.flatten(1)).all(1)
        self.features[slots] = torch.where(
            finite.view(-1, *[1] * (features.dim() - 1)), features, 0
        )
        self.ids[slots] = torch.where(finite.to(self.ids.device), ids.to(self.ids), -1)
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled entries (slot order, not age order: the loss does not care)."""
        if self.filled == self.size:
            return self.features, self.ids
        return self.features[: self.filled], self.ids[: self.filled]

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled entries, oldest first."""
        start = (self.ptr - self.filled) % self.size
        order = (start + torch.arange(self.filled, device=self.ids.device)) % self.size
        return self.features[order], self.ids[order]

    def negatives_mask(self, batch_ids: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: queue entry k is a valid negative for batch row b (other target id)."""
        _, ids = self.valid()  # the queue may live on the host while the batch is on a GPU
        ids = ids.to(batch_ids.device)[None, :]
        return (batch_ids[:, None] != ids) & (ids >= 0)

    def state_dict(self) -> dict:
        return {
            "features": self.features.cpu(),
            "ids": self.ids.cpu(),
            "ptr": self.ptr,
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["features"].shape) != tuple(self.features.shape):
            raise ValueError(
                f"queue shape mismatch: checkpoint {tuple(state['features'].shape)}, "
                f"config {tuple(self.features.shape)}"
            )
        self.features.copy_(state["features"])
        self.ids.copy_(state["ids"])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])


def _gathered(params: list[nn.Parameter]):
    """Full parameters inside the block, also under ZeRO-3 (where `.data` is a placeholder)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class MomentumEncoder:
    """EMA copy of a CoVR model's trainable parameters, used to embed queue entries. A frozen
    vision tower is shared, not copied (the live model computes vision tokens, the copy's
    `target_head` turns them into target embeddings); a trainable one is copied and averaged too.
    Build it before `deepspeed.initialize`; `update` gathers the live parameters, so it also
    works under ZeRO-3."""

    def __init__(self, model: nn.Module, momentum: float = 0.995):
        self.model = model
        self.momentum = momentum
        vision = model.hf.vision_model
        self.share_vision = not any(p.requires_grad for p in vision.parameters())
        if self.share_vision:
            model.hf.vision_model = nn.Identity()  # not copied
        try:
            self.copy = copy.deepcopy(model).requires_grad_(False).eval()
        finally:
            model.hf.vision_model = vision
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self) -> None:
        live = dict(self.model.named_parameters())
        ema = dict(self.copy.named_parameters())
        params = [live[n] for n in self.names]
        with _gathered(params):
            for name, p in zip(self.names, params):
                ema[name].mul_(self.momentum).add_(
                    p.detach().to(ema[name]), alpha=1 - self.momentum
                )

    @property
    def params(self) -> dict[str, torch.Tensor]:
        own = dict(self.copy.named_parameters())
        return {n: own[n] for n in self.names}

    @torch.no_grad()
    def encode_target_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        self.copy.to(pixels.device)  # made on the host, before the engine moved the live model
        if self.share_vision:  # live tokens (bf16 under a bf16 engine) into the fp32 copy
            tokens = self.model._vision(pixels)
            return self.copy.target_head(tokens.to(next(self.copy.parameters()).dtype))
        return self.copy.encode_target_frames(pixels)

    def state_dict(self) -> dict:
        return {n: t.detach().cpu() for n, t in self.params.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ValueError(f"momentum state lacks {missing[:5]}")
        for n, t in self.params.items():
            t.copy_(state[n])
