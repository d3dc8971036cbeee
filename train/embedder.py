"""The embed step: every target of packed shards encoded once by the frozen starting model, the
reference's way (`launch/embed_targets.py`). The model is the one training builds from the same
config (same seed, same starting weights, same frozen target path); `sharding.embed` rewrites
the shards with what `TargetEncoder` returns. On GPUs when present; every rank a share."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from configs.schema import Config, ConfigError
from data.text import tokenize
from data.video import to_model_input
from eval.embed import gather_objects
from sharding.batch import Task, to_device
from sharding.embed import embed_dir

log = logging.getLogger(__name__)


class TargetEncoder:
    """A CoVR model's frozen target path as plain functions of frames and texts (float16 out)."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", batch_size: int = 64):
        self.fingerprint = model.target_fingerprint()  # on the weights as built, before moving
        self.model = model.eval().to(device)
        self.tok, self.device, self.batch_size = tokenizer, torch.device(device), batch_size
        self.size = model.hf.config.vision_config.image_size
        c = model.cfg
        self.info = {
            "arch": c.arch,
            "pretrained": c.pretrained,
            "lavis_checkpoint": c.lavis_checkpoint,
        }

    @torch.no_grad()
    def frames(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for k in range(0, len(frames), self.batch_size):
            pixels = to_device(
                to_model_input(frames[k : k + self.batch_size], self.size), self.device
            )
            out.append(self.model(Task.ENCODE_TARGET_FRAMES, pixels).float().cpu())
        return torch.cat(out).numpy().astype(np.float16)

    @torch.no_grad()
    def captions(self, texts: list[str]) -> np.ndarray:
        out, how = [], self.model.cfg.caption_tokenization()
        for k in range(0, len(texts), self.batch_size):
            text = tokenize(self.tok, texts[k : k + self.batch_size], **how)
            ids, mask = to_device((text.input_ids, text.attention_mask), self.device)
            out.append(self.model(Task.ENCODE_CAPTION, ids, mask).float().cpu())
        return torch.cat(out).numpy().astype(np.float16)


def split_dirs(src: Path, out: Path) -> list[tuple[Path, Path]]:
    """(source, output) pairs: `src` itself when it is one packed split, else each subdirectory
    holding a manifest (train, val, test)."""
    if (src / "manifest.json").is_file():
        return [(src, out)]
    pairs = [(d, out / d.name) for d in sorted(src.iterdir()) if (d / "manifest.json").is_file()]
    if not pairs:
        raise FileNotFoundError(f"{src}: no manifest.json here or in a subdirectory (pack first)")
    return pairs


def embed_targets(
    cfg: Config,
    src: str | Path,
    out: str | Path,
    frames_per_batch: int = 256,
    timeout_s: int = 24 * 3600,
) -> dict[str, dict] | None:
    """Embed every split under `src` into `out`; returns {split: manifest} on rank 0."""
    from train.engine import init_distributed, model_device
    from train.loop import build_model_and_tokenizer

    if cfg.model.train_target_encoder:
        raise ConfigError(
            "key 'model.train_target_encoder': true encodes targets at every step "
            "with the trained weights: there is nothing to precompute"
        )
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world, _ = init_distributed(timeout_s)  # ranks wait for the slowest at the end
    torch.manual_seed(cfg.train.seed)  # training builds its starting model after the same seed
    model, tok = build_model_and_tokenizer(cfg)
    device = model_device()  # after init_distributed: this rank's GPU, where there is one
    encoder = TargetEncoder(model, tok, device)
    if rank == 0:
        log.info(
            "embedding targets on %d rank(s) (%s), model fingerprint %s",
            world,
            device,
            encoder.fingerprint,
        )
    manifests = {}
    for split_src, split_out in split_dirs(Path(src), Path(out)):
        manifests[split_src.name] = embed_dir(
            split_src,
            split_out,
            encoder,
            rank,
            world,
            frames_per_batch,
            gather=gather_objects,
            progress=lambda line: log.info("rank %d: %s", rank, line),
        )
    return manifests if rank == 0 else None
