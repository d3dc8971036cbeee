"""Sharding benchmarks on the synthetic corpus, side by side in one run:

1. packing throughput against the bare cost of decoding the same frames (the packer decodes,
   JPEG-encodes and writes; goal: at most 1.25x the decode itself), and scaling 1 -> 2 workers;
2. training-loader samples/s from shards against reading and decoding the mp4 files per sample
   as the reference code does (goal: at least 10x faster).

    python bench/sharding_bench.py [--videos 300] [--video-frames 240] [--frames 15]

Videos are 10 s at 24 fps by default, closer to WebVid clips (about 18 s) than the demo's 2 s.
"""

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.utils.data import DataLoader  # noqa: E402

from configs.schema import MiningConfig, ShardConfig, SynthConfig  # noqa: E402
from data.corpus import build_synthetic  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from data.video import load_frames  # noqa: E402
from data.webvid_covr import read_annotations, video_path  # noqa: E402
from sharding.batch import collate  # noqa: E402
from sharding.pack import pack  # noqa: E402
from sharding.reader import ShardReader, open_shards  # noqa: E402
from sharding.records import build_records  # noqa: E402


def decode_only(root: Path, rows, cfg: ShardConfig) -> float:
    """The frames the packer needs, decoded and nothing else."""
    start = time.perf_counter()
    for record in build_records(rows, cfg.epoch):
        load_frames(video_path(root / "videos", record["target"]), n=cfg.target_frames)
        for trip in record["triplets"]:
            load_frames(video_path(root / "videos", trip["pth1"]), n=cfg.query_frames)
    return time.perf_counter() - start


def reference_loader(
    root: Path, rows, tok, size: int, frames: int, batch: int, limit: int
) -> float:
    """Per sample: open both mp4 files, decode, resize, collate (the reference's map-style set)."""
    start = time.perf_counter()
    samples = []
    for i, t in enumerate(rows[:limit]):
        samples.append(
            {
                "query_frames": load_frames(video_path(root / "videos", t.pth1), n=1),
                "target_frames": load_frames(video_path(root / "videos", t.pth2), n=frames),
                "edit": t.edit,
                "scores": t.scores,
                "target_id": i,
            }
        )
        if len(samples) == batch:
            collate(samples, tok, size, 32)
            samples = []
    return limit / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--video-frames", type=int, default=240, help="frames per generated video")
    parser.add_argument("--frames", type=int, default=15)
    parser.add_argument("--size", type=int, default=128, help="video side in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        build_synthetic(
            root,
            SynthConfig(videos=args.videos, size=args.size, frames=args.video_frames, fps=24),
            MiningConfig(),
        )
        rows = read_annotations(root / "train.csv")
        cfg = ShardConfig(samples_per_shard=32, target_frames=args.frames, workers=1)
        decode_s = decode_only(root, rows, cfg)
        times = {}
        for workers in (1, 2):
            start = time.perf_counter()
            pack(
                root / "train.csv",
                root / "videos",
                Path(tmp) / f"shards{workers}",
                replace(cfg, workers=workers),
            )
            times[workers] = time.perf_counter() - start
        triplets = len(rows)
        print(
            f"packing {triplets} triplets ({args.frames} target frames, {args.size}px): decode only {decode_s:.1f} s, "
            f"pack 1 worker {times[1]:.1f} s (ratio {times[1] / decode_s:.2f}x), 2 workers {times[2]:.1f} s "
            f"(speed-up {times[1] / times[2]:.2f}x)"
        )

        tok = load_tokenizer(root / "tokenizer")
        shard_dir = Path(tmp) / "shards2"
        shards = open_shards(shard_dir)
        urls, counts = shards.urls, shards.counts
        fn = partial(collate, tokenizer=tok, image_size=args.size, max_text_len=32)
        reader = ShardReader(urls, counts, batch_size=16, collate=fn)
        reader.set_position(0, 0, 1)
        start, n = time.perf_counter(), 0
        for batch, _ in DataLoader(
            reader, batch_size=None, num_workers=0
        ):  # one process, like below
            n += batch["target_ids"].shape[0]
        shard_rate = n / (time.perf_counter() - start)
        ref_rate = reference_loader(
            root, rows, tok, args.size, args.frames, 16, min(160, len(rows))
        )
        print(
            f"loader: shards {shard_rate:.0f} samples/s, mp4 per sample {ref_rate:.1f} samples/s: "
            f"{shard_rate / ref_rate:.1f}x"
        )


if __name__ == "__main__":
    main()
