"""The frozen target encoder of an exported model as a plain function of frames, for packing
target embeddings (`sharding.pack.pack(..., embed=TargetEmbedder(dir))`). It pickles as its
directory and loads the model on first use, once per packing process or Ray task worker."""

from __future__ import annotations

import numpy as np
import torch

from data.video import to_model_input


class TargetEmbedder:
    def __init__(self, model_dir: str):
        self.model_dir = str(model_dir)
        self._model = None

    def __getstate__(self) -> dict:
        return {"model_dir": self.model_dir, "_model": None}

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(Ft, H, W, 3) uint8 -> (Ft, Q, D) float16."""
        if self._model is None:
            from train.checkpoint import load_exported

            self._model = load_exported(self.model_dir)[0].eval()
        with torch.no_grad():
            size = self._model.hf.config.vision_config.image_size
            out = self._model("encode_target_frames", to_model_input(frames, size))
        return out.numpy().astype(np.float16)


def target_embedder(model_dir: str) -> TargetEmbedder | None:
    """The embedder `shards.embed_model` asks for (None when it is empty)."""
    return TargetEmbedder(model_dir) if model_dir else None
