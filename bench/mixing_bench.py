"""Cross-epoch mixing of the training order: how often two records that shared a batch in one
epoch share one again in the next, our shard streaming against a uniform shuffle.

Our order (`sharding.reader.ShardReader`): packing shuffles the records once and cuts them into
shards (`sharding.pack.plan_jobs`); each epoch permutes whole shards, cuts the concatenated
sequence into one contiguous range per (rank, loader worker) slot, and each slot composes its
batches from a buffer of `sampler.buffer` samples (`sharding.samplers.BatchComposer`). The DataLoader
takes a rank's batches from its workers round-robin, and HN-NCE's negatives are the global
batch (every rank's batch of the step, gathered). So the records of one shard meet again in
nearby batches every epoch; the reference's `DataLoader(shuffle=True)` draws fresh partners.

The order is computed on record ids only (no shard is read, nothing decoded), with the project's
own functions: `plan_jobs` (records -> shards), `ShardReader._slot_range` and
`worker_batches` (the epoch's shard permutation, the slot's range and its batch count), `BatchComposer` with
the reader's seeds (`kind: random` never looks at the sample, so record ids stand in for the
drawn triplets). What the reader does around them (read the slot's positions in order, stop
after `worker_batches(w)` batches, worker k % W gives the rank's batch k) is
mirrored here, and `check_mirror` first compares the mirror with the real reader on small tar
shards through a 2-worker DataLoader, batch for batch.

Measures, epoch 1 -> epoch 2 (global batch B, N records, per-rank batch b):
- repeat rate: the fraction of the record pairs that shared a batch in epoch 1 that share one
  again in epoch 2; a uniform shuffle gives about (B - 1) / (N - 1) (printed as "analytic");
- repeated partners: per record, how many of its epoch-1 batch partners are partners again
  (uniform: about (B - 1)^2 / (N - 1));
- same-shard share: of the epoch-1 pairs, those of one shard (uniform: about 1 / shards);
- distinct partners over the recipes' 5 epochs, as a fraction of the 5 (B - 1) partner slots,
  for a sample of records (the negative diversity HN-NCE sees).
Each for the global batch (the negatives) and for the per-rank batch (where the structure is);
and the share of the records an epoch uses (ours: whole batches per rank, shared by its
workers; less than one batch per rank waits for the next epoch).

Candidate fixes, simulated the same way: a larger `sampler.buffer`; a slot reading k shards of
its range at once, records interleaved round-robin (`Setup.interleave`, not in the reader: a
reordering of the slot's positions here); smaller shards (`shards.samples_per_shard`). The
buffer's memory per loader worker is estimated from a sample's bytes (the buffer holds raw
samples: the target's JPEGs or its `target.npy`, one query JPEG, the record's `caption.npy`).

    python bench/mixing_bench.py [--epochs 5] [--sample 2000] [--skip-check] [--triplets]
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from configs.schema import SamplerConfig, ShardConfig  # noqa: E402
from sharding import format as fmt  # noqa: E402
from sharding.pack import plan_jobs  # noqa: E402
from sharding.reader import ShardReader  # noqa: E402
from sharding.samplers import BatchComposer  # noqa: E402

TARGETS = 129_954  # WebVid-CoVR train: target videos (records in `shards.epoch: target`)
TRIPLETS = 1_644_276  # its triplets (records in `shards.epoch: triplet`)
SEED = 1234  # train.seed and shards.seed of both recipes


@dataclass(frozen=True)
class Setup:
    name: str
    records: int
    global_batch: int
    world: int
    workers: int = 8  # shards.loader_workers of both recipes
    buffer: int = 1024  # sampler.buffer default
    per_shard: int = 256  # shards.samples_per_shard default
    interleave: int = 1  # shards a slot reads at once (1: the reader today)

    @property
    def batch(self) -> int:
        return self.global_batch // self.world


# --- the orders ----------------------------------------------------------------------------------


def shard_layout(records: int, per_shard: int, seed: int = SEED) -> list[np.ndarray]:
    """Record ids of each shard, as `plan_jobs` cuts them (the packing shuffle included)."""
    stubs = [{"key": f"v{i:09d}", "target_id": i} for i in range(records)]
    cfg = ShardConfig(samples_per_shard=per_shard, seed=seed)
    jobs = plan_jobs(stubs, "bench", "-", "-", cfg)
    return [np.fromiter((r["target_id"] for r in job.records), np.int64) for job in jobs]


def interleaved(positions: np.ndarray, run_of: np.ndarray, k: int) -> np.ndarray:
    """The slot's positions reordered as if it read k consecutive shards of its range at once,
    one record from each in turn (`run_of`: the shard's place in the epoch's order)."""
    runs = run_of[positions]
    run = np.cumsum(np.r_[0, runs[1:] != runs[:-1]])  # 0, 1, ... per shard of the range
    starts = np.r_[0, np.flatnonzero(np.diff(run)) + 1]
    within = np.arange(len(positions)) - starts[run]
    return positions[np.lexsort((run, within, run // k))]


def our_epoch(shards: list[np.ndarray], s: Setup, epoch: int, seed: int = SEED) -> np.ndarray:
    """(steps, world, batch) record ids: rank r's batch at each optimizer step of the epoch."""
    counts = [len(x) for x in shards]
    urls = [f"shard-{i:06d}" for i in range(len(shards))]
    sampler = SamplerConfig(kind="random", buffer=s.buffer)

    def reader_of(rank: int) -> ShardReader:
        reader = ShardReader(
            urls,
            counts,
            batch_size=s.batch,
            collate=list,
            sampler=sampler,
            rank=rank,
            world=s.world,
            seed=seed,
        )
        reader.set_position(epoch, 0, s.workers)
        return reader

    order, _ = reader_of(0)._slot_range(0)
    sequence = np.concatenate([shards[i] for i in order])  # the epoch's record sequence
    run_of = np.repeat(np.arange(len(order)), [counts[i] for i in order])
    out = np.empty((reader_of(0).batches_per_epoch(), s.world, s.batch), np.int64)
    for rank in range(s.world):
        reader = reader_of(rank)
        for worker in range(s.workers):
            slot = rank * s.workers + worker
            _, positions = reader._slot_range(worker)
            positions = np.asarray(positions, dtype=np.int64)
            if s.interleave > 1:
                positions = interleaved(positions, run_of, s.interleave)
            composer = BatchComposer(
                replace(sampler, buffer=max(s.buffer, s.batch)),
                s.batch,
                seed=f"{seed}-{epoch}-{slot}-compose",
            )
            for index, batch in enumerate(composer(sequence[positions].tolist())):
                if index >= reader.worker_batches(worker):
                    break
                out[index * s.workers + worker, rank] = batch  # DataLoader: round-robin
    return out


def uniform_epoch(s: Setup, rng: np.random.Generator) -> np.ndarray:
    """A uniform shuffle cut into global batches (the reference's DataLoader(shuffle=True)),
    same (steps, world, batch) shape; the last partial batch dropped."""
    steps = s.records // s.global_batch
    return rng.permutation(s.records)[: steps * s.global_batch].reshape(steps, s.world, s.batch)


# --- the measures --------------------------------------------------------------------------------


def batch_of(batches: np.ndarray, records: int) -> np.ndarray:
    """Per record, the index of its batch (rows of `batches`); -1 when the epoch left it out."""
    index = np.full(records, -1, np.int64)
    index[batches.ravel()] = np.repeat(np.arange(len(batches)), batches.shape[1])
    return index


def pairs_in(keys: np.ndarray) -> int:
    """Pairs of equal keys."""
    _, c = np.unique(keys, return_counts=True)
    return int((c * (c - 1) // 2).sum())


def repeats(b1: np.ndarray, b2: np.ndarray, shard: np.ndarray) -> dict:
    """Epoch-1 pairs (batches b1), those again together in b2, and the same-shard ones of each."""
    i1, i2 = batch_of(b1, len(shard)), batch_of(b2, len(shard))
    both = (i1 >= 0) & (i2 >= 0)
    n_shards = int(shard.max()) + 1
    first = len(b1) * b1.shape[1] * (b1.shape[1] - 1) // 2
    again = pairs_in(i1[both] * len(b2) + i2[both])
    seen = i1 >= 0
    same = pairs_in(i1[seen] * n_shards + shard[seen])
    same_again = pairs_in((i1[both] * len(b2) + i2[both]) * n_shards + shard[both])
    return {
        "rate": again / first,
        "partners": 2 * again / int(seen.sum()),
        "same_shard": same / first,
        "same_shard_rate": same_again / max(same, 1),
        "used": float(seen.mean()),
    }


def distinct_partners(epochs: list[np.ndarray], sample: np.ndarray, records: int) -> float:
    """Distinct batch partners of the sampled records over the epochs, as a fraction of the
    partner slots (batch size - 1 per epoch the record was in)."""
    rows, slots = [], np.zeros(len(sample), np.int64)
    for batches in epochs:
        index = batch_of(batches, records)[sample]
        found = index >= 0
        members = np.where(found[:, None], batches[np.maximum(index, 0)], sample[:, None])
        rows.append(members)
        slots += found * (batches.shape[1] - 1)
    together = np.sort(np.concatenate(rows, axis=1), axis=1)
    distinct = 1 + (np.diff(together, axis=1) != 0).sum(1) - 1  # minus the record itself
    return float(distinct.sum() / slots.sum())


def measure(s: Setup, epochs: int, sample_size: int) -> dict:
    """Ours and uniform: epoch 1 -> 2 repeats at the global and the per-rank batch, distinct
    partners over `epochs` epochs."""
    start = time.perf_counter()
    shards = shard_layout(s.records, s.per_shard)
    shard = np.empty(s.records, np.int64)
    for i, ids in enumerate(shards):
        shard[ids] = i
    rng = np.random.default_rng(SEED)
    ours = [our_epoch(shards, s, e) for e in range(max(epochs, 2))]
    uniform = [uniform_epoch(s, rng) for _ in range(max(epochs, 2))]
    sample = rng.choice(s.records, size=min(sample_size, s.records), replace=False)
    result = {"setup": s, "shards": len(shards)}
    for name, order in (("ours", ours), ("uniform", uniform)):
        glob = [o.reshape(len(o), -1) for o in order]
        local = [o.reshape(-1, s.batch) for o in order]
        result[name] = {
            "global": repeats(glob[0], glob[1], shard),
            "rank": repeats(local[0], local[1], shard),
            "distinct": distinct_partners(glob[:epochs], sample, s.records),
            "distinct_rank": distinct_partners(local[:epochs], sample, s.records),
        }
    result["analytic"] = (s.global_batch - 1) / (s.records - 1)
    result["analytic_rank"] = (s.batch - 1) / (s.records - 1)
    result["seconds"] = time.perf_counter() - start
    return result


# --- the mirror against the real reader ----------------------------------------------------------


def _keys(samples: list[dict]) -> list[str]:
    return [x["key"] for x in samples]


def check_mirror() -> None:
    """The real ShardReader (2 ranks, a 2-worker DataLoader each) on small tar shards against
    `our_epoch` on their record ids, batch for batch, two epochs; raises on any difference."""
    from torch.utils.data import DataLoader
    from webdataset import TarWriter

    s = Setup("check", records=130, global_batch=8, world=2, workers=2, buffer=12, per_shard=20)
    shards = shard_layout(s.records, s.per_shard)
    jpeg = fmt.encode_image(np.zeros((8, 8, 3), np.uint8))
    npy = fmt.encode_npy(np.zeros((1, 1, 4), np.float16))
    trip = {"pth1": "q", "txt2": "c", "edit": "e", "scores": [], "group": "g"}
    with tempfile.TemporaryDirectory() as tmp:
        urls = []
        for i, ids in enumerate(shards):
            urls.append(f"{tmp}/shard-{i:06d}.tar")
            with TarWriter(urls[-1]) as sink:
                for r in ids.tolist():
                    meta = {"target": f"t{r}", "target_id": r, "triplets": [trip]}
                    sink.write(
                        {
                            "__key__": f"v{r:09d}",
                            "json": json.dumps(meta).encode(),
                            fmt.query_member(0, 0): jpeg,
                            fmt.EMBEDDINGS: npy,
                        }
                    )
        counts = [len(x) for x in shards]
        for epoch in (0, 1):
            expected = our_epoch(shards, s, epoch)
            for rank in range(s.world):
                reader = ShardReader(
                    urls,
                    counts,
                    batch_size=s.batch,
                    collate=_keys,
                    sampler=SamplerConfig(kind="random", buffer=s.buffer),
                    rank=rank,
                    world=s.world,
                    seed=SEED,
                )
                reader.set_position(epoch, 0, s.workers)
                loader = DataLoader(reader, batch_size=None, num_workers=s.workers)
                got = [[int(k[1:]) for k in keys] for keys, _ in loader]
                want = expected[:, rank].tolist()
                if got != want:
                    raise AssertionError(
                        f"mirror differs from ShardReader: epoch {epoch} rank {rank}"
                    )
    print(f"mirror check: {len(expected)} steps x 2 ranks x 2 epochs identical to ShardReader")


# --- memory --------------------------------------------------------------------------------------

JPEG_KB = 35  # a 364-384 px frame at JPEG q90 (30-40 KB)
TRIPLETS_PER_TARGET = TRIPLETS / TARGETS


def sample_bytes() -> dict[str, float]:
    """Bytes a buffered raw sample holds (the buffer keeps one triplet's query JPEG, but the
    whole record's caption.npy)."""
    caption = TRIPLETS_PER_TARGET * 256 * 2
    return {
        "JPEG shards (15 target + 1 query frame)": 16 * JPEG_KB * 1e3,
        "embedded BLIP-2 (target.npy 15x32x256 f16)": 15 * 32 * 256 * 2 + JPEG_KB * 1e3 + caption,
        "embedded BLIP (target.npy 15x1x256 f16)": 15 * 1 * 256 * 2 + JPEG_KB * 1e3 + caption,
    }


# --- report --------------------------------------------------------------------------------------


def setups(triplets: bool) -> list[tuple[str, list[Setup]]]:
    covr2_8 = Setup("CoVR-2: B 512, 8 ranks x 8 workers", TARGETS, 512, 8)
    covr2_2 = Setup("CoVR-2: B 512, 2 ranks x 8 workers", TARGETS, 512, 2)
    covr_2 = Setup("CoVR: B 1024, 2 ranks x 8 workers", TARGETS, 1024, 2)
    covr_8 = Setup("CoVR: B 1024, 8 ranks x 8 workers", TARGETS, 1024, 8)
    issue = Setup("issue: B 2048, 64 ranks x 8 workers", TARGETS, 2048, 64)
    groups = [
        (
            "recipes (target mode, 129,954 records, 256 per shard, buffer 1024)",
            [covr2_2, covr2_8, covr_2, covr_8, issue],
        ),
        (
            "candidate fixes, CoVR B 1024 on 2 ranks (the worst case above)",
            [replace(covr_2, name=f"buffer {b}", buffer=b) for b in (2048, 4096, 8192)]
            + [replace(covr_2, name=f"interleave {k} shards", interleave=k) for k in (4, 16)]
            + [replace(covr_2, name="interleave 16, buffer 2048", interleave=16, buffer=2048)]
            + [replace(covr_2, name="64 per shard", per_shard=64)],
        ),
        (
            "candidate fixes, CoVR-2 B 512 on 2 ranks",
            [replace(covr2_2, name=f"buffer {b}", buffer=b) for b in (2048, 4096)]
            + [replace(covr2_2, name=f"interleave {k} shards", interleave=k) for k in (4, 16)],
        ),
    ]
    if triplets:
        groups.append(
            (
                "triplet mode (1,644,276 records)",
                [
                    Setup("issue: B 2048, 64 ranks x 8 workers", TRIPLETS, 2048, 64),
                    Setup("CoVR: B 1024, 2 ranks x 8 workers", TRIPLETS, 1024, 2),
                ],
            )
        )
    return groups


def row(r: dict) -> str:
    s, o, u = r["setup"], r["ours"], r["uniform"]
    return (
        f"| {s.name} | {s.batch} | {o['global']['rate']:.3%} / {u['global']['rate']:.3%} / "
        f"{r['analytic']:.3%} | {o['global']['partners']:.1f} / {u['global']['partners']:.1f} | "
        f"{o['rank']['rate']:.3%} / {u['rank']['rate']:.4%} / {r['analytic_rank']:.4%} | "
        f"{o['global']['same_shard']:.2%} ({o['global']['same_shard_rate']:.1%} again) | "
        f"{o['distinct']:.1%} / {u['distinct']:.1%} | {o['distinct_rank']:.1%} / "
        f"{u['distinct_rank']:.1%} | {o['global']['used']:.1%} / {u['global']['used']:.1%} | "
        f"{r['seconds']:.1f} s |"
    )


def main() -> None:
    logging.getLogger("sharding.reader").setLevel(logging.ERROR)  # its buffer warning, per reader
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5, help="for the distinct-partner measure")
    parser.add_argument("--sample", type=int, default=2000, help="records sampled for it")
    parser.add_argument("--skip-check", action="store_true", help="skip the mirror check")
    parser.add_argument("--triplets", action="store_true", help="add triplet mode (1.6M records)")
    args = parser.parse_args()
    start = time.perf_counter()
    if not args.skip_check:
        check_mirror()
    head = (
        "| setup | per-rank batch | global repeat rate: ours / uniform / analytic | "
        "repeated partners per record: ours / uniform | per-rank repeat rate: ours / uniform / "
        f"analytic | same-shard share of epoch-1 global pairs (ours) | distinct partners over "
        f"{args.epochs} epochs, global: ours / uniform | the same, per-rank batch | records used per epoch: ours / "
        "uniform | time |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for title, group in setups(args.triplets):
        print(f"\n{title}\n{head}")
        for s in group:
            print(row(measure(s, args.epochs, args.sample)), flush=True)
    print("\nbuffer memory per loader worker (x 8 workers per rank), estimated:")
    print("| sample | bytes | buffer 1024 | 2048 | 4096 | 8192 |\n|---|---|---|---|---|---|")
    for what, b in sample_bytes().items():
        cells = " | ".join(
            f"{n * b / 2**20:,.0f} MiB ({8 * n * b / 2**30:.1f} GiB)"
            for n in (1024, 2048, 4096, 8192)
        )
        print(f"| {what} | {b / 1e3:,.0f} KB | {cells} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
