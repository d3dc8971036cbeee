"""Data-layer benchmarks, each a ratio measured side by side in one run.

1. Decoder: frames per second of data.video.load_frames (15 centre frames per video) against a
   bare PyAV loop that decodes the same frames of the same files.
2. Mining: captions per second of data.mining.mine on a generated WebVid-like caption table.

    python bench/data_bench.py [--videos 200] [--captions 1000000]
"""

import argparse
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av  # noqa: E402

from data import synthetic  # noqa: E402
from data.captions import CaptionedVideo  # noqa: E402
from data.mining import mine  # noqa: E402
from data.video import centre_indices, load_frames  # noqa: E402


def bare_pyav(path: Path, n: int) -> int:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        wanted = set(centre_indices(stream.frames, n))
        last = max(wanted)
        got = 0
        for i, frame in enumerate(c.decode(stream)):
            if i in wanted:
                frame.to_ndarray(format="rgb24")
                got += 1
            if i == last:
                break
    return got


def bench_decoder(videos: int, frames: int, size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_corpus(tmp, videos=videos, frames=frames, size=size, workers=2)
        paths = sorted(Path(tmp, "videos").rglob("*.mp4"))
        result = {}
        for rep in range(2):  # alternate to share cache and CPU state fairly
            for name, fn in (
                ("project", lambda p: len(load_frames(p, n=15))),
                ("bare", lambda p: bare_pyav(p, 15)),
            ):
                start = time.perf_counter()
                count = sum(fn(p) for p in paths)
                if rep == 1:
                    result[name] = count / (time.perf_counter() - start)
    result["ratio_project_over_bare"] = result["project"] / result["bare"]
    return result


def caption_table(n: int, seed: int = 0) -> list[CaptionedVideo]:
    """WebVid-like captions: Zipf-distributed words, with a share of one-word variants."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(vocab))))
    captions = []
    while len(captions) < n:
        words = rng.choices(vocab, cum_weights=cum, k=rng.randint(6, 14))
        captions.append(" ".join(words))
        for _ in range(rng.choice((0, 0, 1, 2))):  # planted one-word variants
            variant = list(words)
            variant[rng.randrange(len(variant))] = rng.choice(vocab)
            captions.append(" ".join(variant))
    return [CaptionedVideo(str(i), f"{i // 50:06d}", c) for i, c in enumerate(captions[:n])]


def bench_mining(n: int) -> dict:
    table = caption_table(n)
    start = time.perf_counter()
    result = mine(table, progress=False)
    seconds = time.perf_counter() - start
    return {"captions": n, "seconds": seconds, "captions_per_s": n / seconds, **result.stats}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--captions", type=int, default=1_000_000)
    args = parser.parse_args()
    dec = bench_decoder(args.videos, args.frames, args.size)
    print(
        f"decoder: project {dec['project']:.0f} frames/s, bare PyAV {dec['bare']:.0f} frames/s, "
        f"ratio {dec['ratio_project_over_bare']:.3f}"
    )
    m = bench_mining(args.captions)
    print(
        f"mining: {m['captions']} captions in {m['seconds']:.1f} s = {m['captions_per_s']:.0f} captions/s; "
        f"{m['caption_pairs']} caption pairs, {m['triplets_train']} train triplets"
    )


if __name__ == "__main__":
    main()
