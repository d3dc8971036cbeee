"""AdamW over the trainable parameters and a cosine schedule with optional linear warm-up:
`cosine` moves every optimizer step, `cosine_epoch` once per epoch (the reference's
CosineSchedule, called at each epoch start: with 5 epochs the factors 1, .905, .655, .345, .095)."""

from __future__ import annotations

import math

import torch

from configs.schema import OptimConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2),
        fused=fused or None,
    )


def cosine_factor(
    step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate at optimizer step `step`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_epoch_factor(
    step: int, steps_per_epoch: int, epochs: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> float:
    """The reference's per-epoch cosine: constant within epoch e, 0.5 * (1 + cos(pi * e / epochs))."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    epoch = step // max(1, steps_per_epoch)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int = 0
):
    if cfg.schedule == "cosine_epoch":
        if steps_per_epoch <= 0:
            raise ValueError("optim.schedule=cosine_epoch needs the number of steps per epoch")
        epochs = math.ceil(total_steps / steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: cosine_epoch_factor(
                step, steps_per_epoch, epochs, cfg.warmup_steps, cfg.min_lr_ratio
            ),
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )
