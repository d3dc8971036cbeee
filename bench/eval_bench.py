"""Evaluation benchmarks, side by side in one run:
1. search on a 1M x 256 gallery with 1K queries (top-10): FAISS exact (IndexFlatIP) and IVF
   against brute-force torch matmul + topk (time ratios), and IVF's recall@10 agreement with
   exact search; HNSW optionally (its build is slow on 2 cores);
2. embedding throughput (images/s) of the gallery and query encoders at `tiny` and `base` size.

    python bench/eval_bench.py [--gallery 1000000] [--queries 1000] [--dim 256] [--hnsw]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.train_bench import model_and_batch  # noqa: E402
from eval.search import IndexSpec, build_index, search, topk_agreement  # noqa: E402
from sharding.batch import Task  # noqa: E402


def timed(fn, repeat: int = 1):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def search_bench(g: int, q: int, d: int, k: int, hnsw: bool) -> None:
    rng = np.random.default_rng(0)
    # clustered data (as embeddings are), normalised: 4096 centres + noise
    centres = rng.standard_normal((4096, d), dtype=np.float32)
    gallery = centres[rng.integers(0, 4096, g)] + 0.5 * rng.standard_normal(
        (g, d), dtype=np.float32
    )
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[rng.integers(0, g, q)] + 0.3 * rng.standard_normal((q, d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gt, qt = torch.from_numpy(gallery), torch.from_numpy(queries)

    def brute():
        return (qt @ gt.t()).topk(k, dim=1).indices.numpy()

    t_torch, exact = timed(brute, 2)
    flat = build_index(gallery)
    t_flat, (_, flat_ids) = timed(lambda: search(flat, queries, k), 2)
    print(f"gallery {g} x {d}, {q} queries, top-{k}, {torch.get_num_threads()} threads")
    print(f"  torch matmul+topk      {t_torch * 1e3:9.1f} ms   1.00x")
    print(
        f"  faiss flat (exact)     {t_flat * 1e3:9.1f} ms   {t_torch / t_flat:.2f}x faster   "
        f"top-{k} agreement {topk_agreement(exact, flat_ids, k):.2f}%"
    )
    start = time.perf_counter()
    ivf = build_index(gallery, IndexSpec("ivf", nlist=4096))
    build = time.perf_counter() - start
    for nprobe in (8, 32):
        ivf.nprobe = nprobe
        t_ivf, (_, ivf_ids) = timed(lambda: search(ivf, queries, k), 2)  # noqa: B023
        print(
            f"  faiss ivf4096 nprobe {nprobe:<2} {t_ivf * 1e3:9.1f} ms   {t_torch / t_ivf:.2f}x faster   "
            f"recall@{k} vs exact {topk_agreement(exact, ivf_ids, k):.2f}%   (build {build:.0f} s)"
        )
    if hnsw:
        start = time.perf_counter()
        index = build_index(gallery, IndexSpec("hnsw"))
        build = time.perf_counter() - start
        t_h, (_, h_ids) = timed(lambda: search(index, queries, k), 2)
        print(
            f"  faiss hnsw32 ef128     {t_h * 1e3:9.1f} ms   {t_torch / t_h:.2f}x faster   "
            f"recall@{k} vs exact {topk_agreement(exact, h_ids, k):.2f}%   (build {build:.0f} s)"
        )


@torch.no_grad()
def embed_bench(size: str, batch: int = 64, rounds: int = 5) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, b = model_and_batch(tmp, size, batch)
        model.eval()
        frames = b["query_frames"]
        target = lambda: model(Task.ENCODE_TARGET, frames)  # noqa: E731
        query = lambda: model(Task.ENCODE_QUERY, frames, b["input_ids"], b["attention_mask"])  # noqa: E731
        target(), query()
        t_target, _ = timed(target, rounds)
        t_query, _ = timed(query, rounds)
        print(
            f"  {size:5s} gallery {batch / t_target:8.0f} images/s   queries {batch / t_query:8.0f} /s"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hnsw", action="store_true")
    a = p.parse_args()
    faiss.omp_set_num_threads(torch.get_num_threads())
    search_bench(a.gallery, a.queries, a.dim, a.k, a.hnsw)
    print("embedding throughput (CPU, 32 px frames, batch 64):")
    for size in ("tiny", "base"):
        embed_bench(size)


if __name__ == "__main__":
    main()
