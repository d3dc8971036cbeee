"""Video decoding with PyAV, frame selection, resize and CLIP normalisation.

Every failure to open or decode (missing, corrupt, truncated file) is a `VideoDecodeError`
naming the file, so a data worker can catch it, count it and move on.
"""

from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or decoded as asked."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"{path}: {reason}")


def centre_indices(num_frames: int, n: int) -> list[int]:
    """The reference's frame choice. n=1: the middle frame, `num_frames // 2` (its query frame).
    n>1 (its target frames): with a = linspace(0, num_frames, n + 1) cut to integers, frame
    (a[i] + a[i+1] - 1) // 2 of each interval; a video shorter than n keeps all its frames
    (fewer than n: the batch masks the missing slots)."""
    if num_frames <= 0:
        raise ValueError("video has no frames")
    if n == 1:
        return [num_frames // 2]
    if num_frames < n:
        return list(range(num_frames))
    a = np.linspace(0, num_frames, n + 1).astype(int)  # numpy's rounding, as the reference
    return [int(lo + hi - 1) // 2 for lo, hi in zip(a[:-1], a[1:])]


def select_indices(
    num_frames: int, n: int = 1, mode: str = "centre", rng: random.Random | None = None
) -> list[int]:
    """`centre`: centres of n equal intervals (n=1 is the middle frame); `random`: one
    uniformly random frame per interval."""
    if mode == "centre":
        return centre_indices(num_frames, n)
    if mode == "random":
        rng = rng or random.Random()
        bounds = [(i * num_frames) // n for i in range(n + 1)]
        return [rng.randrange(lo, max(lo + 1, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    raise ValueError(f"unknown frame mode {mode!r} (centre or random)")


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(path, "file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoDecodeError(path, f"cannot open: {err}") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "no video stream")
    return container


def count_frames(path: str | Path) -> int:
    """Frame count from the stream header, else from duration x rate."""
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        if stream.duration and stream.time_base and stream.average_rate:
            return max(
                1, int(round(float(stream.duration * stream.time_base * stream.average_rate)))
            )
        raise VideoDecodeError(path, "frame count unknown")


def decode_frames(path: str | Path, indices: list[int]) -> np.ndarray:
    """Decode the frames at `indices` (any order, repeats allowed) as (N, H, W, 3) uint8 RGB.
    Frames in between are decoded (H.264 needs them) but not converted."""
    wanted = sorted(set(indices))
    if not wanted:
        raise ValueError("no frame indices given")
    got: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            pos, target = 0, 0
            for frame in container.decode(stream):
                if pos == wanted[target]:
                    got[pos] = frame.to_ndarray(format="rgb24")
                    target += 1
                    if target == len(wanted):
                        break
                pos += 1
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoDecodeError(path, f"decode failed at frame {pos}: {err}") from None
    if len(got) < len(wanted):
        raise VideoDecodeError(
            path, f"truncated: frame {wanted[len(got)]} requested, only {pos} decodable"
        )
    return np.stack([got[i] for i in indices])


def to_model_input(frames: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float, bicubic resize, CLIP-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x.clamp_(0.0, 1.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_frames(
    path: str | Path,
    n: int = 1,
    mode: str = "centre",
    size: int | None = None,
    rng: random.Random | None = None,
) -> np.ndarray | torch.Tensor:
    """The usual call: pick `n` frames by `mode`, decode, and (if `size`) resize + normalise."""
    frames = decode_frames(path, select_indices(count_frames(path), n, mode, rng))
    return frames if size is None else to_model_input(frames, size)
