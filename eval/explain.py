"""Attention explanations of a composed query (the seed work's explainability study).

For one (frame, edit) query and a target embedding:
- `patch_attention`: the fusion's cross-attention over the query frame's patches, averaged over
  heads, layers and the attending tokens (BLIP-2: the 32 query tokens; BLIP: the edit's tokens);
- `patch_gradcam`: the same maps weighted by the gradient of the query-target score,
  clamped at 0 (Grad-CAM on attention), averaged the same way;
- `word_attention` / `word_relevance`: the attention the embedding's tokens pay to each edit word
  in the self-attention layers, plain and gradient-weighted.
Attention probabilities are captured by forward hooks on the attention modules (the eager
attention path, which is switched on for the duration of the call).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.text import tokenize
from eval.embed import eval_mode
from eval.similarity import similarity
from sharding.batch import device_of, to_device


@dataclass
class Explanation:
    patch_attention: np.ndarray  # (gh, gw), sums to 1
    patch_gradcam: np.ndarray  # (gh, gw), sums to 1 (or all 0)
    words: list[str]
    word_attention: np.ndarray  # (T,), sums to 1
    word_relevance: np.ndarray  # (T,)
    score: float


def _attention_modules(model):
    """(cross-attention modules, self-attention modules) of the fusion encoder."""
    if model.cfg.arch == "blip2":
        layers = model.hf.qformer.encoder.layer
        cross = [
            lyr.crossattention.attention
            for lyr in layers
            if getattr(lyr, "has_cross_attention", False)
        ]
        return cross, [lyr.attention.attention for lyr in layers]
    layers = model.hf.text_encoder.encoder.layer
    return [lyr.crossattention.self for lyr in layers], [lyr.attention.self for lyr in layers]


@contextlib.contextmanager
def _eager_attention(model):
    config = model.hf.qformer.config if model.cfg.arch == "blip2" else model.hf.text_encoder.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def _record(modules, store: list):
    def hook(_module, _inputs, output):
        probs = output[1]
        if probs is not None and probs.requires_grad:
            probs.retain_grad()
        store.append(probs)

    return [m.register_forward_hook(hook) for m in modules]


def _cam(maps: list[torch.Tensor], rows: slice, cols: slice, weighted: bool) -> torch.Tensor:
    """Mean over layers, heads and the attending rows of attention (or grad x attention)."""
    out = []
    for a in maps:
        x = a[0, :, rows, cols]
        if weighted:
            x = (
                (a.grad[0, :, rows, cols] * x).clamp(min=0)
                if a.grad is not None
                else torch.zeros_like(x)
            )
        out.append(x.mean(0).mean(0))
    return torch.stack(out).mean(0)


def _normalise(x: torch.Tensor) -> np.ndarray:
    x = x.detach().float().clamp(min=0)
    total = x.sum()
    return (x / total if total > 0 else x).cpu().numpy()


def explain(
    model, tokenizer, frame: torch.Tensor, edit: str, target: torch.Tensor, reduce: str = "mean"
) -> Explanation:
    """`frame` (3, H, W) model input; `target` the target tokens (T, D) to score against."""
    text = tokenize(tokenizer, [edit], model.cfg.max_text_len, model.cfg.edit_words)
    frame, ids, mask, target = to_device(
        (frame, text.input_ids, text.attention_mask, target), device_of(model)
    )
    cross_modules, self_modules = _attention_modules(model)
    cross, selfs = [], []
    hooks = _record(cross_modules, cross) + _record(self_modules, selfs)
    try:
        with eval_mode(model), _eager_attention(model), torch.enable_grad():
            fused = model.encode_fusion(frame[None, None], ids, mask)
            score = similarity(fused, target[None].to(fused.dtype), reduce)[0, 0]
            score.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    vision = model.hf.config.vision_config
    grid = vision.image_size // vision.patch_size
    patches = slice(1, 1 + grid * grid)  # the first frame's patches (token 0 is CLS)
    n_words = int(text.attention_mask.sum())
    if model.cfg.arch == "blip2":  # the query tokens read the frame and the edit
        q = model.num_query_tokens
        cross_rows, word_rows, words = slice(0, q), slice(0, q), slice(q, q + n_words)
    else:  # the edit's tokens read the frame; [ENC] (whose output is the embedding) reads words
        cross_rows, word_rows, words = slice(0, n_words), slice(0, 1), slice(0, n_words)
    return Explanation(
        patch_attention=_normalise(_cam(cross, cross_rows, patches, False)).reshape(grid, grid),
        patch_gradcam=_normalise(_cam(cross, cross_rows, patches, True)).reshape(grid, grid),
        words=tokenizer.convert_ids_to_tokens(text.input_ids[0, :n_words].tolist()),
        word_attention=_normalise(_cam(selfs, word_rows, words, False)),
        word_relevance=_cam(selfs, word_rows, words, True).detach().float().cpu().numpy(),
        score=score.item(),
    )


def overlay(frame: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) frame with a (gh, gw) heat map blended over it."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = frame.shape[:2]
    span = heat.max() - heat.min()
    norm = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    up = (
        np.asarray(Image.fromarray((norm * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
        / 255.0
    )
    colour = colormaps["jet"](up)[..., :3] * 255
    return (frame * (1 - alpha) + colour * alpha).astype(np.uint8)


def save_explanation(expl: Explanation, frame: np.ndarray, edit: str, path: str | Path) -> Path:
    """One PNG: the frame, both heat maps over it, and the per-word relevance bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    axes[0].imshow(frame)
    axes[0].set_title("query frame")
    axes[1].imshow(overlay(frame, expl.patch_attention))
    axes[1].set_title("cross-attention")
    axes[2].imshow(overlay(frame, expl.patch_gradcam))
    axes[2].set_title("gradient-weighted")
    for ax in axes[:3]:
        ax.axis("off")
    y = np.arange(len(expl.words))
    axes[3].barh(y, expl.word_attention, color="tab:blue", alpha=0.6, label="attention")
    rel = expl.word_relevance
    axes[3].barh(
        y,
        rel / rel.max() * expl.word_attention.max() if rel.max() > 0 else rel,
        height=0.4,
        color="tab:red",
        label="grad-weighted (scaled)",
    )
    axes[3].set_yticks(y, expl.words)
    axes[3].invert_yaxis()
    axes[3].legend(fontsize=7)
    axes[3].set_title("edit words")
    fig.suptitle(f"{edit}  (score {expl.score:.3f})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
