"""The reference's released target embeddings, read into embedded shards.

Teams start from the embeddings the reference published instead of re-embedding millions of
videos. Its embedding scripts write one file per video, `<dir>/<folder>/<video id>.pth`, holding
the per-frame embeddings of the frozen starting model: BLIP-2 (F, 32, 256) (the Q-Former's
projected query tokens), BLIP (F, 256) (the projected CLS token, stored here as (F, 1, 256)),
both L2-normalised; F frames spread over the video (15 by default). Their target-caption
embeddings are one `torch.save`d dict {"texts": [...], "feats": (n, D)} (`txt2_<csv stem>.pth`).
Files holding raw ViT tokens (their `save_all_tokens` option) are not targets and are refused.

`import_released` rewrites packed shards as `sharding.embed` does: the target frames replaced by
the file's embeddings (float16), the caption embeddings from the dict when given, query frames
kept byte for byte; the manifest's `embedded` section says `released: true`, the directory, the
(tokens, dims) layout and a fingerprint of where they came from. Files are loaded weights-only
(`torch.load(weights_only=True)`: a released file cannot run code). A record without its file is
skipped and counted (a test split: an error, unless it was packed as a subset). Training and
evaluation use such shards only with `model.released_targets=true` (`check_embedded`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from data.paths import UnsafePathError, check_inside
from sharding import format as fmt
from sharding.embed import EmbedError, embed_dir
from sharding.writer import ShardStats

RAW_TOKEN_DIMS = 768  # wider than any projection: ViT hidden states (save_all_tokens)


class ReleasedFileError(ValueError):
    """A released embedding file that does not hold what the reference's scripts write."""


def load_released(path: Path) -> np.ndarray:
    """(F, Q, D) float16 from one released `.pth`."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only refusals all land here
        raise ReleasedFileError(f"{path}: not a released embedding file ({err})") from None
    if not isinstance(value, torch.Tensor):
        raise ReleasedFileError(f"{path}: holds {type(value).__name__}, not a tensor")
    if value.ndim == 2:  # BLIP: one projected CLS token per frame
        value = value[:, None]
    if value.ndim != 3 or value.shape[0] == 0:
        raise ReleasedFileError(f"{path}: shape {tuple(value.shape)}, not (frames, [tokens,] dims)")
    if value.shape[-1] >= RAW_TOKEN_DIMS:
        raise ReleasedFileError(
            f"{path}: shape {tuple(value.shape)} holds raw ViT tokens (save_all_tokens), "
            "not projected target embeddings"
        )
    if not torch.isfinite(value).all():
        raise ReleasedFileError(f"{path}: holds NaN or Inf")
    return value.float().numpy().astype(np.float16)


def load_caption_embeddings(path: Path) -> dict[str, np.ndarray]:
    """{text: (D,)} from a released `txt2_*.pth`."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ReleasedFileError(f"{path}: not a released caption file ({err})") from None
    if not isinstance(value, dict) or not {"texts", "feats"} <= set(value):
        raise ReleasedFileError(f"{path}: expected a dict with 'texts' and 'feats'")
    texts, feats = value["texts"], value["feats"]
    if len(texts) != len(feats):
        raise ReleasedFileError(f"{path}: {len(texts)} texts but {len(feats)} embeddings")
    feats = torch.as_tensor(feats).float().numpy().astype(np.float16)
    return dict(zip(texts, feats))


class ReleasedTargets:
    """The rewrite `embed_dir` applies: each record's target from its released file."""

    def __init__(self, emb_dir: str | Path, captions: str | Path | None = None):
        self.dir = Path(emb_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"released embeddings: no directory {self.dir}")
        self.captions_file = Path(captions) if captions else None
        self.captions = load_caption_embeddings(self.captions_file) if captions else None
        first = next(self.dir.rglob("*.pth"), None)  # lazy: the first of millions
        if first is None:
            raise FileNotFoundError(f"released embeddings: no .pth file under {self.dir}")
        self.layout = load_released(first).shape[1:]
        h = hashlib.sha256(f"released/{self.dir.resolve().name}".encode())
        if self.captions_file:
            h.update(self.captions_file.read_bytes())
        self.fingerprint = "released-" + h.hexdigest()[:12]

    @property
    def info(self) -> dict:
        return {
            "released": True,
            "dir": str(self.dir.resolve()),
            "captions": str(self.captions_file.resolve()) if self.captions_file else None,
            "layout": list(self.layout),
        }

    def _target(self, meta: dict) -> np.ndarray:
        try:
            path = check_inside(self.dir, self.dir / f"{meta['target']}.pth")
        except UnsafePathError as err:
            raise ReleasedFileError(str(err)) from None
        if not path.is_file():
            raise ReleasedFileError(f"{path}: file not found")
        target = load_released(path)
        if target.shape[1:] != self.layout:
            raise EmbedError(
                f"{path}: (tokens, dims) {target.shape[1:]}, the others {self.layout}: one "
                "directory holds one model's embeddings"
            )
        return target

    def _captions(self, meta: dict) -> np.ndarray | None:
        if self.captions is None:
            return None
        missing = [t["txt2"] for t in meta["triplets"] if t["txt2"] not in self.captions]
        if missing:
            raise ReleasedFileError(f"{self.captions_file}: no embedding of caption {missing[0]!r}")
        return np.stack([self.captions[t["txt2"]] for t in meta["triplets"]])

    def __call__(self, chunk: list[dict], stats: ShardStats, strict: bool) -> list[dict]:
        out = []
        for record in chunk:
            meta = fmt.record_meta(record)
            try:
                target, captions = self._target(meta), self._captions(meta)
            except ReleasedFileError as err:
                if strict:
                    raise EmbedError(
                        f"{record.get('__url__')}: record {record['__key__']}: {err} (a test "
                        "split loses nothing: pack it with --subset to evaluate what exists)"
                    ) from None
                rows = [t["row"] for t in meta["triplets"]]
                stats.skipped.append(
                    {
                        "key": record["__key__"],
                        "video": meta["target"],
                        "rows": rows,
                        "reason": f"released target: {err}",
                    }
                )
                stats.skipped_records += 1
                stats.skipped_triplets += len(rows)
                continue
            out.append(fmt.embedded_record(record, target, captions))
        return out


def import_released(
    src_dir: str | Path, emb_dir: str | Path, out_dir: str | Path, captions=None
) -> dict:
    """One packed split -> embedded shards holding the released targets; returns the manifest.
    Resumable like `embed_dir` (finished shards are kept)."""
    released = ReleasedTargets(emb_dir, captions)
    return embed_dir(src_dir, out_dir, released, rewrite=released)
