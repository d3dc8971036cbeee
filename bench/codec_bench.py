"""What storing frames as JPEG costs (`shards.frame_format`, `shards.jpeg_quality`), one run.

The reference embeds decoded frames; packing stores JPEG (quality 90 by default) or PNG
(lossless). For 15 centre frames of each synthetic video: bytes per frame, PSNR against the
decoded frame, encode + decode time, and how far each codec moves the frozen target path's
embedding (1 - cosine of token-mean embeddings against the lossless frame), set beside the
distance between two different videos' frames, the scale a ranking depends on. The model is a
randomly initialised BLIP-2 of BERT-base width (no weights can be downloaded here), so the
embedding column says how far JPEG noise moves a ViT's features, not a trained model's recall.

    python bench/codec_bench.py [--videos 20] [--size 128]
"""

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs.schema import TextSize, VisionSize  # noqa: E402
from data import synthetic  # noqa: E402
from data.tokenizer import build_vocab_tokenizer  # noqa: E402
from data.video import load_frames, to_model_input  # noqa: E402
from data.webvid_covr import video_path  # noqa: E402
from sharding import format as fmt  # noqa: E402
from sharding.batch import Task  # noqa: E402
from tests.tiny import WORDS, tiny_model_config  # noqa: E402
from train.models import build_model  # noqa: E402

CODECS = [("png", 0), ("jpeg", 95), ("jpeg", 90), ("jpeg", 75)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def embed(model, frames: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, D) unit token-mean embeddings of the frozen target path."""
    tokens = model(Task.ENCODE_TARGET_FRAMES, to_model_input(frames, size))
    return F.normalize(tokens.float().mean(1), dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--videos", type=int, default=20)
    p.add_argument("--size", type=int, default=128, help="video and model image size (px)")
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        specs = synthetic.write_corpus(tmp, videos=a.videos, frames=48, size=a.size, workers=1)
        paths = [video_path(Path(tmp) / "videos", s.pth) for s in specs]
        frames = np.concatenate([load_frames(path, n=15) for path in paths])
        video_of = np.repeat(np.arange(len(paths)), 15)
        cfg = replace(
            tiny_model_config("blip2"),
            vision=VisionSize(768, 4, 12, 3072, a.size, 16),
            text=TextSize(768, 4, 12, 3072, 1, 64),
        )
        model = build_model(cfg, build_vocab_tokenizer([WORDS], Path(tmp) / "tok")).eval()
    reference = embed(model, frames, a.size)
    other = reference[np.roll(np.arange(len(frames)), 15)]  # a frame of the next video
    assert not (video_of == np.roll(video_of, 15)).any()
    between_videos = (1 - (reference * other).sum(-1)).mean().item()
    print(
        f"{len(frames)} frames of {len(paths)} synthetic videos at {a.size} px; "
        f"1 - cos between two videos' frames: {between_videos:.2e}"
    )
    print("codec      bytes/frame  PSNR dB  enc+dec ms/frame  1 - cos  / between videos")
    for kind, quality in CODECS:
        start = time.perf_counter()
        blobs = [fmt.encode_image(f, 0, quality or 90, kind) for f in frames]
        coded = fmt.decode_frames(blobs)
        ms = (time.perf_counter() - start) * 1e3 / len(frames)
        shift = (1 - (embed(model, coded, a.size) * reference).sum(-1)).mean().item()
        name = kind if kind == "png" else f"jpeg q{quality}"
        print(
            f"{name:10s} {np.mean([len(b) for b in blobs]):11.0f}  "
            f"{np.mean([psnr(x, y) for x, y in zip(frames, coded)]):7.1f}  "
            f"{ms:16.2f}  {shift:7.1e}  {shift / between_videos:15.4f}"
        )


if __name__ == "__main__":
    main()
