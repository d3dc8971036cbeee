"""Embedding benchmark images and composed queries, split across ranks.

`distributed_embed` gives rank r the items r, r + world, ... (every item exactly once, no
padding duplicates), embeds them in batches and gathers the results back into item order on
every rank. Single-process use is the case world = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.text import tokenize
from data.video import to_model_input
from sharding.format import ImageDecodeError, decode_rgb


def distributed_embed(
    n: int,
    embed_batch: Callable[[list[int]], torch.Tensor],
    batch_size: int = 64,
    rank: int = 0,
    world: int = 1,
    desc: str = "embed",
    progress: bool = False,
) -> torch.Tensor:
    """(n, ...) float32 CPU tensor; `embed_batch(indices)` embeds the listed items."""
    mine = list(range(rank, n, world))
    parts = []
    with tqdm(total=len(mine), desc=desc, disable=not progress or rank != 0) as bar:
        for k in range(0, len(mine), batch_size):
            chunk = mine[k : k + batch_size]
            with torch.no_grad():
                parts.append(embed_batch(chunk).float().cpu())
            bar.update(len(chunk))
    local = (mine, torch.cat(parts) if parts else None)
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    shape = next(p[1].shape[1:] for p in gathered if p[1] is not None)
    out = torch.empty((n, *shape))
    seen = 0
    for indices, values in gathered:
        if values is not None:
            out[indices] = values
            seen += len(indices)
    assert seen == n, f"embedded {seen} items, expected {n}"
    return out


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size), normalised as the video frames are."""
    try:
        pixels = decode_rgb(path)[None]
    except ImageDecodeError as err:
        raise ImageDecodeError(f"{path}: {err}") from None
    return to_model_input(pixels, size)[0]


def embed_images(
    model, paths: list, batch_size=64, rank=0, world=1, progress=False
) -> torch.Tensor:
    """Gallery images -> target tokens (G, Tg, D)."""
    size = model.hf.config.vision_config.image_size

    device = next(model.parameters()).device

    def batch(indices):
        pixels = torch.stack([load_image(paths[i], size) for i in indices])[:, None]
        return model("encode_target", pixels.to(device))

    return distributed_embed(len(paths), batch, batch_size, rank, world, "gallery", progress)


def embed_image_queries(
    model,
    tokenizer,
    reference_paths: list,
    edits: list[str],
    batch_size=64,
    rank=0,
    world=1,
    progress=False,
    text_len: int = 64,
) -> torch.Tensor:
    """(reference image, edit text) pairs -> query tokens (Q, Tq, D); edits tokenised as the
    reference's test scripts: at most `text_len` tokens, padded to the batch's longest."""
    size = model.hf.config.vision_config.image_size

    device = next(model.parameters()).device

    def batch(indices):
        pixels = torch.stack([load_image(reference_paths[i], size) for i in indices])[:, None]
        text = tokenize(tokenizer, [edits[i] for i in indices], text_len, padding="longest")
        return model(
            "encode_query",
            pixels.to(device),
            text.input_ids.to(device),
            text.attention_mask.to(device),
        )

    return distributed_embed(len(edits), batch, batch_size, rank, world, "queries", progress)
