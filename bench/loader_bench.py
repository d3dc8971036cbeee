"""The training loader at WebVid-like clip length and resolution, side by side in one run, one
process each (what one loader worker does):

1. embedded shards (one query JPEG per sample, the targets' frame embeddings as float16
   (15, 32, 256), BLIP-2's layout) against decoding both mp4 files per sample (1 query frame,
   15 target frames); goal: at least 10x;
2. the same embedded shards against the reference's own embedded path: the query frame decoded
   from its mp4 and the target's embeddings loaded from a per-video `.pth` file;
3. JPEG-target shards (15 target JPEGs per sample), for the cost of decoding target frames;
4. embedded shards over HTTP from a server on 127.0.0.1, streamed and from the local cache, as a
   share of reading them from local disk.

The embeddings come from a seeded random encoder of the BLIP-2 layout: the loader's cost does not
depend on their values, and no model is needed.

    python bench/loader_bench.py [--videos 48] [--seconds 18] [--size 336]
"""

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from configs.schema import MiningConfig, ShardConfig, SynthConfig  # noqa: E402
from data.corpus import build_synthetic  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from data.video import load_frames  # noqa: E402
from data.webvid_covr import read_annotations, video_path  # noqa: E402
from sharding.batch import collate  # noqa: E402
from sharding.embed import embed_dir  # noqa: E402
from sharding.pack import pack  # noqa: E402
from sharding.reader import ShardReader, open_shards  # noqa: E402
from sharding.remote import Fetch  # noqa: E402
from tests.flaky_http import serve  # noqa: E402

BATCH = 8


class RandomEncoder:
    """Stands in for the frozen target path: BLIP-2's output shapes, seeded values."""

    fingerprint = "bench-random-(32,256)"
    info = {"arch": "bench-random"}

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def frames(self, frames: np.ndarray) -> np.ndarray:
        return self.rng.standard_normal((len(frames), 32, 256)).astype(np.float16)

    def captions(self, texts: list[str]) -> np.ndarray:
        return self.rng.standard_normal((len(texts), 256)).astype(np.float16)


def shard_rate(shards, tok, image_size: int, fetch: Fetch | None = None) -> float:
    """Samples/s of the training reader over one epoch, in this process."""
    fn = partial(collate, tokenizer=tok, image_size=image_size, max_text_len=32)
    reader = ShardReader(
        shards.urls,
        shards.counts,
        batch_size=BATCH,
        collate=fn,
        checksums=shards.checksums,
        sizes=shards.sizes,
        fetch=fetch,
    )
    reader.set_position(0, 0, 1)
    start, n = time.perf_counter(), 0
    for batch, _ in DataLoader(reader, batch_size=None, num_workers=0):
        n += batch["target_ids"].shape[0]
    return n / (time.perf_counter() - start)


def mp4_rate(root: Path, rows, tok, image_size: int, frames: int, limit: int, pth_dir=None):
    """Per sample: decode the query frame from its mp4, and the target's frames from its mp4
    (or, with `pth_dir`, load its embeddings from `<target>.pth`: the reference's layout); then
    collate, as a map-style dataset does."""
    start, samples = time.perf_counter(), []
    for i, t in enumerate(rows[:limit]):
        sample = {
            "query_frames": load_frames(video_path(root / "videos", t.pth1), n=1),
            "edit": t.edit,
            "scores": t.scores,
            "target_id": i,
        }
        if pth_dir is None:
            sample["target_frames"] = load_frames(video_path(root / "videos", t.pth2), n=frames)
        else:
            emb = torch.load(pth_dir / f"{t.pth2.replace('/', '_')}.pth", weights_only=True)
            sample["target_embeddings"] = emb.numpy()
        samples.append(sample)
        if len(samples) == BATCH:
            collate(samples, tok, image_size, 32)
            samples = []
    return limit / (time.perf_counter() - start)


def write_pth(rows, out: Path, encoder: RandomEncoder, frames: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for target in sorted({t.pth2 for t in rows}):
        emb = torch.from_numpy(encoder.frames(np.zeros((frames, 1, 1, 3), np.uint8)))
        torch.save(emb, out / f"{target.replace('/', '_')}.pth")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=18.0, help="clip length (WebVid: ~18)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--size", type=int, default=336, help="video side (WebVid: 336 high)")
    parser.add_argument("--image-size", type=int, default=364, help="model input (BLIP-2: 364)")
    parser.add_argument("--frames", type=int, default=15, help="target frames per sample")
    parser.add_argument("--limit", type=int, default=64, help="samples for the mp4 loaders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "corpus"
        t0 = time.perf_counter()
        build_synthetic(
            root,
            SynthConfig(
                videos=args.videos,
                size=args.size,
                frames=int(args.seconds * args.fps),
                fps=args.fps,
            ),
            MiningConfig(),
        )
        rows = read_annotations(root / "train.csv")
        cfg = ShardConfig(samples_per_shard=16, target_frames=args.frames, workers=2)
        pack(root / "train.csv", root / "videos", tmp / "jpeg", cfg)
        encoder = RandomEncoder()
        embed_dir(tmp / "jpeg", tmp / "emb", encoder)
        write_pth(rows, tmp / "pth", encoder, args.frames)
        print(
            f"{args.videos} videos of {args.seconds:g} s at {args.fps} fps, {args.size} px; "
            f"{len(rows)} triplets; set up in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        tok = load_tokenizer(root / "tokenizer")
        emb, jpeg = open_shards(tmp / "emb"), open_shards(tmp / "jpeg")
        limit = min(args.limit, len(rows))
        rates = {}
        for _ in range(2):  # the second round counts: files cached, code warm
            rates["embedded"] = shard_rate(emb, tok, args.image_size)
            rates["jpeg"] = shard_rate(jpeg, tok, args.image_size)
            rates["mp4"] = mp4_rate(root, rows, tok, args.image_size, args.frames, limit)
            rates["mp4+pth"] = mp4_rate(
                root, rows, tok, args.image_size, args.frames, limit, tmp / "pth"
            )
        with serve(tmp) as (url, _):
            remote = open_shards(f"{url}/emb")
            rates["http"] = shard_rate(remote, tok, args.image_size)
            cached = Fetch(cache_dir=str(tmp / "cache"), cache_bytes=1 << 34)
            shard_rate(remote, tok, args.image_size, cached)  # fills the cache
            rates["http-cached"] = shard_rate(remote, tok, args.image_size, cached)
        mb = sum(emb.sizes) / len(emb.urls) / 1e6
        print(f"samples/s, one process (embedded shards: {mb:.1f} MB each):")
        for name, rate in rates.items():
            print(f"  {name:12s} {rate:8.1f}")
        e = rates["embedded"]
        print(f"embedded / mp4 per sample:    {e / rates['mp4']:.1f}x (goal >= 10x)")
        print(f"embedded / mp4 + .pth:        {e / rates['mp4+pth']:.1f}x")
        print(f"embedded / JPEG-target shards: {e / rates['jpeg']:.1f}x")
        print(
            f"http / local: {rates['http'] / e:.2f}, cached / local: {rates['http-cached'] / e:.2f}"
        )


if __name__ == "__main__":
    main()
