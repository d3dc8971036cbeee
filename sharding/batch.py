"""The contract between the data and the model: samples -> model batch (`collate`), the batch
moved to where the model is (`to_device`), and what the model is asked (`Task`) and answers
(`Composed`); `train.models` implements the model side.

A sample is a dict: `query_frames` uint8 (Fq, H, W, 3); `target_frames` uint8 (Ft, H, W, 3) or
`target_embeddings` float (Ft, Q, D); `edit` str; `scores` list of floats (one per target
frame, else ignored); `target_id` int; `group` any hashable; optionally `caption` (target
caption, for the caption term), `caption_embedding` float (D,) (its precomputed embedding) and
`targets` (every valid target id of the query, for `loss.positives=all`).

The batch's `target_positives` (B, MAX_POSITIVES) long holds each row's own target id first,
then its other valid targets, -1 padded (a fixed width, so every rank's batch gathers).
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

import numpy as np
import torch

from data.text import MAX_WORDS, tokenize
from data.video import to_model_input


def _pad_frames(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(x.shape[0] for x in items)
    out = items[0].new_zeros((len(items), longest, *items[0].shape[1:]))
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, x in enumerate(items):
        out[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = True
    return out, mask


DESCRIPTION_MODES = ("ignore", "concat", "separate")
MAX_POSITIVES = 16  # valid targets kept per query (TF-CoVR: up to 10); more are negatives


def target_positives(samples: list[dict]) -> torch.Tensor:
    out = torch.full((len(samples), MAX_POSITIVES), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        own = int(s["target_id"])
        ids = [own, *(int(t) for t in s.get("targets", ()) if int(t) != own)]
        out[i, : min(len(ids), MAX_POSITIVES)] = torch.tensor(ids[:MAX_POSITIVES])
    return out


def query_text(sample: dict, description: str) -> str:
    """The query's text: its edit, then (concat) the description of its video."""
    if description not in DESCRIPTION_MODES:
        raise ValueError(f"unknown model.description {description!r}; one of {DESCRIPTION_MODES}")
    extra = sample.get("description", "") if description == "concat" else ""
    return f"{sample['edit']} {extra}" if extra else sample["edit"]


def query_inputs(batch: dict) -> tuple:
    """The arguments of `model(Task.COMPOSE | Task.ENCODE_QUERY, ...)` in a collated batch:
    frames, edit ids and mask, then the description's ids and mask where collated."""
    inputs = (batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    if "description_input_ids" in batch:
        inputs += (batch["description_input_ids"], batch["description_attention_mask"])
    return inputs


def collate(
    samples: list[dict],
    tokenizer,
    image_size: int,
    max_text_len: int,
    padding: str = "max_length",
    caption: dict | None = None,
    edit_words: int = MAX_WORDS,
    description: str = "ignore",
    description_tokens: int = 128,
) -> dict:
    """Model batch; edits cleaned to `edit_words` words and at most `max_text_len` tokens,
    padded to it (training) or to the longest of the batch (`padding="longest"`, evaluation);
    target captions tokenised by the `caption` arguments of `data.text.tokenize`
    (`ModelConfig.caption_tokenization`; default: as the edits). `description="concat"`: a
    sample's query-video description follows its edit in the one text (within the same words
    and tokens); `"separate"`: it is its own text of at most `description_tokens` tokens
    (`description_input_ids` / `description_attention_mask`; a sample without one has an
    all-zero mask row, which the model reads as absent)."""
    edits = tokenize(
        tokenizer,
        [query_text(s, description) for s in samples],
        max_text_len,
        edit_words,
        padding=padding,
    )
    batch = {
        "query_frames": torch.stack(
            [to_model_input(s["query_frames"], image_size) for s in samples]
        ),
        "input_ids": edits.input_ids,
        "attention_mask": edits.attention_mask,
        "target_ids": torch.tensor([int(s["target_id"]) for s in samples], dtype=torch.long),
        "target_positives": target_positives(samples),
    }
    if description == "separate":
        texts = [s.get("description", "") for s in samples]
        tokens = tokenize(tokenizer, texts, description_tokens, description_tokens, padding)
        absent = torch.tensor([not t.strip() for t in texts])
        batch["description_input_ids"] = tokens.input_ids
        batch["description_attention_mask"] = tokens.attention_mask.masked_fill(absent[:, None], 0)
    if "target_embeddings" in samples[0]:
        targets = [
            torch.as_tensor(np.asarray(s["target_embeddings"], dtype=np.float32)) for s in samples
        ]
        batch["target_embeddings"], mask = _pad_frames(targets)
    else:
        targets = [to_model_input(s["target_frames"], image_size) for s in samples]
        batch["target_frames"], mask = _pad_frames(targets)
    batch["target_mask"] = mask
    scores = torch.full(mask.shape, float("nan"))
    for i, s in enumerate(samples):  # a count that differs from the frames means uniform pooling
        if len(s.get("scores") or []) == int(mask[i].sum()):
            scores[i, : len(s["scores"])] = torch.tensor(s["scores"], dtype=torch.float32)
    batch["target_scores"] = scores
    if "caption" in samples[0]:
        caption = caption or {"max_length": max_text_len, "padding": padding}
        captions = tokenize(tokenizer, [s["caption"] for s in samples], **caption)
        batch["caption_input_ids"], batch["caption_attention_mask"] = (
            captions.input_ids,
            captions.attention_mask,
        )
    if "caption_embedding" in samples[0]:
        batch["caption_embeddings"] = torch.as_tensor(
            np.stack([s["caption_embedding"] for s in samples]), dtype=torch.float32
        )
    return batch


def augment(
    batch: dict, rng, *, hflip: float = 0.0, shift: int = 0, target_frames: int = 0
) -> dict:
    """Training augmentation of a collated batch: per sample, one horizontal flip (with
    probability `hflip`) and one translation of up to `shift` pixels, the same for its query and
    its target frames; then, with `target_frames`, a random subset of that many of each target's
    frames (or packed frame embeddings), in their order. `rng`: a `random.Random` (the reader
    seeds it per batch: resumable)."""
    if hflip or shift:
        _flip_and_shift(batch, rng, hflip, shift)
    if target_frames:
        _subset_target_frames(batch, rng, target_frames)
    return batch


def _flip_and_shift(batch: dict, rng, hflip: float, shift: int) -> None:
    if "target_frames" not in batch:
        raise ValueError(
            "augment.hflip/augment.shift need target frames; these shards hold packed target "
            "embeddings (launch/embed_targets.py): set both to 0"
        )
    for key in ("query_frames", "target_frames"):
        if batch[key].ndim != 5:
            raise ValueError(
                f"batch[{key!r}]: expected (B, F, 3, H, W), got {tuple(batch[key].shape)}"
            )
    for i in range(batch["query_frames"].shape[0]):
        flip = rng.random() < hflip
        dx, dy = (rng.randint(-shift, shift), rng.randint(-shift, shift)) if shift else (0, 0)
        for key in ("query_frames", "target_frames"):
            x = batch[key][i]
            if flip:
                x = x.flip(-1)
            if dx or dy:
                x = _translate(x, dx, dy)
            batch[key][i] = x


def _subset_target_frames(batch: dict, rng, k: int) -> None:
    """Keep k frames per target, drawn among its valid ones (a target with fewer keeps them all,
    padded with masked slots): the target side then costs k / F of the packed frames."""
    key = "target_frames" if "target_frames" in batch else "target_embeddings"
    mask = batch["target_mask"]
    if mask.shape[1] <= k:
        return
    rows = []
    for valid in mask:
        keep = valid.nonzero().flatten().tolist()
        keep = sorted(rng.sample(keep, k)) if len(keep) > k else keep
        pad = (~valid).nonzero().flatten().tolist()[: k - len(keep)]
        rows.append(keep + pad)
    index = torch.tensor(rows)
    batch["target_mask"] = mask.gather(1, index)
    batch["target_scores"] = batch["target_scores"].gather(1, index)
    batch[key] = batch[key][torch.arange(len(rows))[:, None], index]


def _translate(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(..., H, W) moved right by dx and down by dy pixels; the uncovered edge repeats the border."""
    h, w = x.shape[-2:]
    cols = (torch.arange(w) - dx).clamp_(0, w - 1)
    rows = (torch.arange(h) - dy).clamp_(0, h - 1)
    return x[..., rows, :][..., cols]


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: the device every batch it reads must be moved to."""
    return next(model.parameters()).device


def pin_memory_for(device) -> bool:
    """Page-locked loader batches only for a CUDA device: the host-to-device copy can then run
    asynchronously (`to_device`) and overlap the previous step's kernels; on CPU it is pure cost."""
    return torch.device(device).type == "cuda"


def to_device(batch, device):
    """The batch's tensors on `device` (a tensor, a dict or a tuple; other values, lists of ids
    included, stay as they are), copied without blocking the host (asynchronous from pinned
    memory; CUDA orders the copy before the kernels that read it). The one way training,
    validation, evaluation, explanations and the embed step move their inputs."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    return batch


class Task(StrEnum):
    """What one call of the model's single entry point computes (`model(Task.COMPOSE, ...)`);
    each value names the method it runs."""

    COMPOSE = "compose"  # -> Composed
    ENCODE_QUERY = "encode_query"  # -> (B, Q, D)
    ENCODE_TARGET = "encode_target"  # -> (B, Q, D)
    ENCODE_TARGET_FRAMES = "encode_target_frames"  # -> (N, Q, D)
    ENCODE_TEXT = "encode_text"  # -> (B, D)
    ENCODE_CAPTION = "encode_caption"  # -> (B, D)
    ENCODE_IMAGE = "encode_image"  # -> (B, D)


class Composed(NamedTuple):
    """The composed query: its tokens (B, Q, D), and the `mlp` combiner's (fusion, image, text)
    weights (B, 3) (None for the other combiners)."""

    query: torch.Tensor
    combiner_weights: torch.Tensor | None
