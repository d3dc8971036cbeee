"""Embedding items split across ranks: the one routine every protocol and validation use.

`distributed_embed` gives rank r the items r, r + world, ... of a stream (every item exactly
once, no padding duplicates), embeds them in batches as they arrive (a rank never holds more than
one batch of decoded inputs) and gathers the results back into item order on every rank.
Single-process use is the case world = 1. The embedding functions move their inputs to the
model's device; results come back as float32 CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.text import tokenize
from data.video import to_model_input
from sharding.batch import Task, device_of, to_device
from sharding.format import ImageDecodeError, decode_rgb

Embedded = torch.Tensor | tuple[torch.Tensor, ...]


@contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode for the block, its train/eval mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def distributed_embed(
    items: Iterable,
    embed_batch: Callable[[list], Embedded],
    batch_size: int = 64,
    rank: int = 0,
    world: int = 1,
    desc: str = "embed",
    progress: bool = False,
    total: int | None = None,
) -> Embedded:
    """`embed_batch(chunk)` embeds a list of this rank's items: one tensor, or a tuple of tensors
    with one row per item each; the result has the same structure, (n, ...) float32 on the CPU
    in item order. `items` is the whole stream, read by every rank (`total`: its length, for
    the progress bar only)."""
    mine, parts, chunk, as_tuple = [], [], [], []

    def flush():
        with torch.no_grad():
            out = embed_batch(chunk)
        as_tuple[:] = [isinstance(out, tuple)]
        out = out if isinstance(out, tuple) else (out,)
        parts.append(tuple(o.float().cpu() for o in out))
        bar.update(len(chunk))
        chunk.clear()

    shown = -(-total // world) if total is not None else None
    with tqdm(total=shown, desc=desc, disable=not progress or rank != 0) as bar:
        for i, item in enumerate(items):
            if i % world == rank:
                mine.append(i)
                chunk.append(item)
                if len(chunk) == batch_size:
                    flush()
        if chunk:
            flush()
    local = (mine, [torch.cat(col) for col in zip(*parts)] if parts else None, as_tuple)
    gathered = gather_objects(local) if world > 1 else [local]
    n = sum(len(indices) for indices, _, _ in gathered)
    filled = [(values, tup) for _, values, tup in gathered if values is not None]
    if not filled:
        raise ValueError(f"{desc}: nothing to embed")
    outs = [torch.empty((n, *col.shape[1:])) for col in filled[0][0]]
    for indices, values, _ in gathered:
        for out, col in zip(outs, values or ()):
            out[indices] = col
    return tuple(outs) if filled[0][1][0] else outs[0]


def gather_objects(obj) -> list:
    """Every rank's `obj` in rank order (any picklable object; tensors inside on the CPU): the
    one object gather, used here and by the embed step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
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

    def batch(chosen):
        pixels = torch.stack([load_image(path, size) for path in chosen])[:, None]
        return model(Task.ENCODE_TARGET, to_device(pixels, device_of(model)))

    return distributed_embed(paths, batch, batch_size, rank, world, "gallery", progress, len(paths))


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
    reference's test scripts: cleaned to the model's `edit_words`, at most `text_len` tokens,
    padded to the batch's longest."""
    size = model.hf.config.vision_config.image_size

    def batch(pairs):
        text = tokenize(
            tokenizer,
            [edit for _, edit in pairs],
            text_len,
            model.cfg.edit_words,
            padding="longest",
        )
        pixels = torch.stack([load_image(path, size) for path, _ in pairs])[:, None]
        inputs = to_device((pixels, text.input_ids, text.attention_mask), device_of(model))
        return model(Task.ENCODE_QUERY, *inputs)

    pairs = list(zip(reference_paths, edits, strict=True))
    return distributed_embed(pairs, batch, batch_size, rank, world, "queries", progress, len(pairs))
