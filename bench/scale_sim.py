"""Scale, checked by simulation: what the training reader, its state and the checks do at the
size the code is for (1.6M triplets in 10,000 shards on 64 ranks x 8 loader workers), without a
model or decoded data (the reader's split logic is positions; `ShardReader._slot_range` is the
layout every worker reads).

  python bench/scale_sim.py [--out runs/scale_sim.json]

1. The epoch layout at 64 x 8, batch 32 per rank: every record at most once, exactly once but
   for the tail (< one global batch), the same batches on every rank.
2. A resume mid-epoch on 48 ranks: each of the 512 slots consumed a random subset of its
   records (the samplers do not consume in order), the loader's state gathered them; the new
   layout of the rest on 48 x 8 repeats nothing, skips nothing beyond its tail.
3. How costs grow with the corpus (10k, 100k, 1.6M triplets, 160 per shard): reader start-up
   (the layout of one worker) and its memory, the manifest's size and load time, the
   checkpoint's loader state (consumed positions) half-way through an epoch, the preflight's
   shard checks, and a flat FAISS search of 1,000 queries over a gallery of the corpus's size
   (up to 1M, 256-d, the validation's search).
4. What validation holds after embedding a gallery of that size (`eval.embed.distributed_embed`
   with `eval.retrieval.compared_rows`, BLIP-2's 32 target tokens of 256): token means (the
   `mean` rule, the default) against every token (`max`), measured where it fits in memory;
   the model's own time per item is the GPU's and is not simulated."""

import argparse
import io
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "launch"))  # for _bootstrap; after the root (launch/eval.py)

PER_SHARD = 160


def counts_for(triplets: int, seed: int = 0) -> list[int]:
    """Shard sizes around PER_SHARD (packing's last shards and skips make them uneven)."""
    rng = random.Random(seed)
    counts = []
    while sum(counts) < triplets:
        counts.append(min(PER_SHARD - rng.randint(0, 8), triplets - sum(counts)))
    return counts


def reader(counts, rank, world, batch, workers, excluded=()):
    from sharding.reader import ShardReader

    r = ShardReader(
        [f"/shards/covr-{i:06d}.tar" for i in range(len(counts))],
        counts,
        batch_size=batch,
        collate=lambda s: s,
        rank=rank,
        world=world,
        seed=1234,
    )
    r.set_position(0, 0, workers, excluded)
    return r


def layout(counts, world, batch, workers, excluded=()) -> tuple[list[np.ndarray], list[int]]:
    """Every slot's positions (rank-major) and every rank's batches."""
    slots, batches = [], []
    for rank in range(world):
        r = reader(counts, rank, world, batch, workers, excluded)
        batches.append(r.batches_per_epoch())
        for w in range(workers):
            slots.append(np.asarray(r._slot_range(w)[1], dtype=np.int64))
    return slots, batches


def check_layout(total: int, slots, batches, world, batch, excluded=None):
    every = np.concatenate(slots + [np.zeros(0, np.int64) if excluded is None else excluded])
    unique = np.unique(every)
    left = total - len(unique)
    return {
        "records": total,
        "batches_per_rank": sorted(set(batches)),
        "equal_batches": len(set(batches)) == 1,
        "repeated": int(len(every) - len(unique)),
        "left_for_the_tail": int(left),
        "tail_under_one_global_batch": 0 <= left < world * batch,
    }


def simulate_resume(counts, batch, workers, seed=0) -> dict:
    total = sum(counts)
    start = time.perf_counter()
    slots, batches = layout(counts, 64, batch, workers)
    first = check_layout(total, slots, batches, 64, batch)
    first["seconds_for_all_512_slots"] = round(time.perf_counter() - start, 2)
    # mid-epoch: each slot has consumed k of its batches, a random subset of its records
    rng = np.random.default_rng(seed)
    k = batches[0] // workers // 2
    consumed = np.concatenate(
        [rng.choice(s, size=min(len(s), k * batch), replace=False) for s in slots]
    )
    start = time.perf_counter()
    moved_slots, moved_batches = layout(counts, 48, batch, workers, excluded=consumed)
    second = check_layout(total, moved_slots, moved_batches, 48, batch, np.sort(consumed))
    second["consumed_before_the_move"] = int(len(consumed))
    second["seconds_for_all_384_slots"] = round(time.perf_counter() - start, 2)
    overlap = np.intersect1d(np.concatenate(moved_slots), consumed)
    second["consumed_read_again"] = int(len(overlap))
    return {"64_ranks_x_8_workers": first, "resumed_on_48_ranks": second}


def growth(triplets: int, tmp: Path) -> dict:
    import torch
    from _bootstrap import preflight

    from configs.schema import load_config
    from train.loader import TrainLoader

    counts = counts_for(triplets)
    out = {"triplets": triplets, "shards": len(counts)}
    tracemalloc.start()
    start = time.perf_counter()
    r = reader(counts, 0, 64, 32, 8)
    r._slot_range(0)
    out["reader_start_s"] = round(time.perf_counter() - start, 4)
    out["reader_start_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
    tracemalloc.stop()
    # a manifest of that many shards, in the packer's schema
    shard_dir = tmp / f"t{triplets}" / "train"
    shard_dir.mkdir(parents=True)
    manifest = {
        "shards": [
            {
                "name": f"covr-{i:06d}",
                "samples": n,
                "triplets": n,
                "bytes": n * 90_000,
                "sha256": "0" * 64,
            }
            for i, n in enumerate(counts)
        ],
        "totals": {"samples": triplets},
    }
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    for i in range(len(counts)):
        (shard_dir / f"covr-{i:06d}.tar").touch()
    out["manifest_kib"] = round((shard_dir / "manifest.json").stat().st_size / 1024, 1)
    start = time.perf_counter()
    json.loads((shard_dir / "manifest.json").read_text())
    out["manifest_load_s"] = round(time.perf_counter() - start, 4)
    (shard_dir.parent / "val").symlink_to(shard_dir)
    cfg = load_config(None, [f"shards.dir={shard_dir.parent}"])
    start = time.perf_counter()
    preflight(cfg)
    out["preflight_s"] = round(time.perf_counter() - start, 4)
    # the loader's state half-way through the epoch: every rank's consumed positions
    loader = TrainLoader.__new__(TrainLoader)
    loader.reader, loader.workers = r, 8
    loader.epoch, loader.batch_in_epoch = 0, r.batches_per_epoch() // 2
    loader.excluded = torch.zeros(0, dtype=torch.long)
    loader.seen = torch.zeros(0, dtype=torch.long)
    loader.consumed = list(np.random.default_rng(0).permutation(sum(counts))[: sum(counts) // 2])
    buf = io.BytesIO()
    start = time.perf_counter()
    torch.save(loader.state_dict(), buf)
    out["loader_state_save_s"] = round(time.perf_counter() - start, 4)
    out["loader_state_kib"] = round(len(buf.getvalue()) / 1024, 1)
    # the validation's search: 1,000 queries over a gallery of the corpus's size (<= 1M)
    import faiss

    gallery = min(triplets, 1_000_000)
    xb = np.random.default_rng(1).standard_normal((gallery, 256), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(256)
    start = time.perf_counter()
    index.add(xb)
    index.search(xb[:1000], 50)
    out["gallery"] = gallery
    out["flat_search_1000_queries_s"] = round(time.perf_counter() - start, 3)
    for reduce in ("mean", "max"):
        if reduce == "max" and gallery * 32 * 256 * 4 > 8 << 30:
            continue  # over 8 GiB: not on this machine (the mean rule is the default)
        out[f"gallery_rows_{reduce}"] = gallery_rows_held(gallery, reduce)
    return out


def gallery_rows_held(items: int, reduce: str, batch: int = 512) -> dict:
    """Embed `items` gallery rows of BLIP-2's target layout (one random batch, reused: the
    model is not what is measured) the way validation does; the bytes it then holds."""
    import torch

    from eval.embed import distributed_embed
    from eval.retrieval import compared_rows

    tokens = torch.randn(batch, 32, 256)
    query = torch.randn(batch, 1, 256)

    def embed(chunk):
        q, t = compared_rows(query[: len(chunk)], tokens[: len(chunk)], reduce)
        return q, t

    start = time.perf_counter()
    q, g = distributed_embed(range(items), embed, batch)
    held = q.numel() * q.element_size() + g.numel() * g.element_size()
    return {"s": round(time.perf_counter() - start, 2), "held_mib": round(held / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/scale_sim.json")
    args = p.parse_args(argv)
    import faiss
    import torch

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    result = {"layout": simulate_resume(counts_for(1_600_000), batch=32, workers=8)}
    print(json.dumps(result, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["growth"] = [growth(n, Path(tmp)) for n in (10_000, 100_000, 1_600_000)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["growth"], indent=1))
    ok = result["layout"]["64_ranks_x_8_workers"]
    moved = result["layout"]["resumed_on_48_ranks"]
    good = all(
        [
            ok["equal_batches"],
            not ok["repeated"],
            ok["tail_under_one_global_batch"],
            moved["equal_batches"],
            not moved["repeated"],
            not moved["consumed_read_again"],
            moved["tail_under_one_global_batch"],
        ]
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
