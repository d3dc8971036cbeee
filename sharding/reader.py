"""Stream shards into training and evaluation.

Training (`ShardReader`, an IterableDataset yielding ready batches):
- Every (rank, DataLoader worker) pair is a *slot*. Each epoch the shards are permuted with
  (seed, epoch), the same permutation on every rank, and the concatenated record sequence is cut
  into contiguous ranges of whole batches: every rank the same number, split over its workers as
  evenly as whole batches allow (the first workers one more). What is left, less than one batch
  per rank, waits for the next epoch's permutation. So every rank yields the same number of
  batches whatever the shard sizes, no record is read by two slots in one epoch, and no slot
  reads records it cannot make a batch of.
- Within a slot: records -> (target mode) one triplet drawn per record -> batch composition
  (`sharding.samplers.BatchComposer`: random / hns / fs / mix, which also shuffles) -> decoding ->
  collate -> optional augmentation (`sharding.batch.augment`, seeded per batch). Decoding comes last, so resuming mid-epoch replays the cheap part and skips batches
  already consumed: the position is (epoch, batches consumed), saved in the training checkpoint.
- Bad data never ends the job: a shard that cannot be opened (deleted after the start) or is
  truncated loses its records (`corrupt_shards`), a record that is not in the format (`.json`
  that does not decode, keys or frames missing) is skipped (`malformed`), the shard named in the
  log. The slot then reads on from the start of its range, round the whole epoch sequence, to
  keep its count (`resampled`). A sample whose JPEG does not decode is replaced by a copy of
  another sample of the same batch, drawn per batch (`undecodable`). A shard read to its end
  whose bytes are not those the manifest's sha256 recorded is named and counted
  (`checksum_mismatch`: hashed as it streams in the loader workers; 6% of reading and decoding
  a shard of 32 px frames here, less where JPEG decoding is heavier). Counts travel with each
  batch (`BatchInfo.stats`) and are logged at a bounded rate.
- `shard_urls` checks that every shard of the manifest is present with its recorded size
  before anything starts: one error lists those that are not.
- The reader yields (batch, `BatchInfo`): the batch is tensors only; the info names each row's
  record and the positions (in the epoch's record sequence) of the records the batch drew. A job resumed
  on another number of ranks or workers passes the positions its epoch consumed as `excluded`:
  the rest of the sequence is cut into equal ranges for the new slots (what is left over, fewer
  than one batch per slot, waits for the next epoch like the tail above).

Evaluation (`iter_records`): shards in manifest order, every record exactly once.
"""

from __future__ import annotations

import hashlib
import logging
import random
import subprocess
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from configs.schema import SamplerConfig
from sharding import format as fmt
from sharding.mix import TARGET_ID_STRIDE, Source, check_sources, epoch_shards
from sharding.remote import Fetch, forget_cached, is_remote, join, open_remote
from sharding.samplers import BatchComposer

log = logging.getLogger(__name__)


class ShardURLError(ValueError):
    """A shard URL the reader will not open."""


class MissingShardsError(FileNotFoundError):
    """Shards the manifest lists are absent or not the size it recorded."""

    def __init__(self, shard_dir: str | Path, problems: list[str]):
        self.problems = problems
        shown = "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
        super().__init__(
            f"{shard_dir}: {len(problems)} shard(s) of the manifest missing or changed: {shown} "
            "(pack again, or `launch/shard.py verify`)"
        )


def open_shard(
    url: str,
    allow_pipe: bool = False,
    fetch: Fetch | None = None,
    size: int | None = None,
    sha256: str | None = None,
):
    """Local path, `pipe:COMMAND` (only when allowed), or any URL fsspec opens: read in retried
    ranged chunks, or through the local cache (`sharding.remote`; `size` and `sha256` from the
    manifest where known)."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ShardURLError(
                f"refusing shard URL {url!r}: `pipe:` runs a shell command; set shards.allow_pipe=true"
            )
        return subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE).stdout
    if is_remote(url):
        return open_remote(url, size, sha256, fetch or Fetch())
    return open(url.removeprefix("file://"), "rb")


class _Hashing:
    """A read-only stream that hashes what is read through it."""

    def __init__(self, stream):
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data

    def rest(self) -> str:
        while self.read(1 << 20):  # tar's end blocks and padding, unread by tarfile
            pass
        return self.digest.hexdigest()

    def close(self) -> None:
        self.stream.close()


def read_shard(
    url: str,
    allow_pipe: bool = False,
    on_error: Callable[[str, Exception], None] | None = None,
    sha256: str | None = None,
    on_mismatch: Callable[[str], None] | None = None,
    size: int | None = None,
    fetch: Fetch | None = None,
):
    """Records (dicts of field -> bytes, plus `__key__`) of one shard; an open or read error
    ends the shard (a truncated tar has nothing after the break) and is reported to `on_error`.
    `sha256`: the manifest's checksum; a shard read to its end whose bytes differ is reported to
    `on_mismatch` (its records were read: the warning says the shard changed since packing),
    and a cached copy of it is dropped. `size`, `fetch`: for remote shards (`open_shard`)."""
    try:
        stream = open_shard(url, allow_pipe, fetch, size, sha256)
    except ShardURLError:
        raise
    except Exception as err:  # FileNotFoundError (deleted after the start), fsspec errors, ...
        if on_error is None:
            raise
        on_error(url, err)
        return
    if sha256:
        stream = _Hashing(stream)
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)
        if sha256 and stream.rest() != sha256:
            forget_cached(url, sha256, fetch)
            if on_mismatch is not None:
                on_mismatch(url)
    except Exception as err:  # tarfile.ReadError, EOFError, OSError, ...
        forget_cached(url, sha256, fetch)  # a cached copy that no longer parses
        if on_error is None:
            raise
        on_error(url, err)
    finally:
        stream.close()


def iter_records(
    urls: list[str], allow_pipe: bool = False, fetch: Fetch | None = None
) -> Iterator[dict]:
    """Evaluation order: shards as listed, records as stored, each exactly once (a remote read
    that fails on every attempt raises: an evaluation never leaves records out)."""
    for url in urls:
        yield from read_shard(url, allow_pipe, fetch=fetch)


def shard_urls(shard_dir: str | Path, manifest: dict) -> tuple[list[str], list[int]]:
    """The manifest's shard paths and record counts; `MissingShardsError` listing every shard
    that is absent or not the size the manifest recorded (remote: where the store lists its
    directory, see `remote_problems`)."""
    base = str(shard_dir).rstrip("/")
    problems = remote_problems(base, manifest) if is_remote(base) else []
    for s in manifest["shards"] if not is_remote(base) else []:
        path = Path(base) / f"{s['name']}.tar"
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{path.name} missing")
            continue
        if size != s["bytes"]:
            problems.append(f"{path.name} has {size} bytes, the manifest {s['bytes']}")
    if problems:
        raise MissingShardsError(shard_dir, problems)
    return [f"{base}/{s['name']}.tar" for s in manifest["shards"]], [
        s["samples"] for s in manifest["shards"]
    ]


def remote_problems(base: str, manifest: dict) -> list[str]:
    """Shards a remote directory's listing lacks (or holds at another size). Only a listing that
    names `manifest.json` is trusted (a web server's index page may list anything else); where
    there is none, missing shards show when read (skipped and counted)."""
    from sharding.remote import filesystem

    try:
        fs, path = filesystem(base)
        listed = {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size")
            for e in fs.ls(path, detail=True)
        }
    except Exception as err:  # no listing on this server or store
        log.info("%s: not listed (%r): shards are checked as they are read", base, err)
        return []
    if "manifest.json" not in listed:
        log.info("%s: its listing does not name manifest.json: not used to check shards", base)
        return []
    problems = []
    for s in manifest["shards"]:
        name = f"{s['name']}.tar"
        if name not in listed:
            problems.append(f"{name} missing")
        elif listed[name] is not None and listed[name] != s["bytes"]:
            problems.append(f"{name} has {listed[name]} bytes, the manifest {s['bytes']}")
    return problems


@dataclass(frozen=True)
class ShardSet:
    """One split's shards as a run reads them: its manifest, read once, and the shard paths and
    record counts it lists (checked present and of the recorded size when opened). `dir` is a
    Path, or a URL string for remote shards."""

    dir: Path | str
    manifest: dict
    urls: list[str]
    counts: list[int]

    @property
    def checksums(self) -> list[str | None]:
        return [s.get("sha256") for s in self.manifest["shards"]]

    @property
    def sizes(self) -> list[int]:
        return [s["bytes"] for s in self.manifest["shards"]]


def open_shards(shard_dir: str | Path, fetch: Fetch | None = None) -> ShardSet:
    from sharding.manifest import read_manifest

    manifest = read_manifest(shard_dir, fetch)
    urls, counts = shard_urls(shard_dir, manifest)
    return ShardSet(join(shard_dir), manifest, urls, counts)


def draw_triplet(
    record: dict, rng: random.Random, groups: dict[int, int] | None = None, meta=None
) -> dict:
    """One training sample from a record: a random triplet (target mode: one per epoch)."""
    meta = meta if meta is not None else fmt.record_meta(record)
    sample = fmt.raw_triplet(record, rng.randrange(len(meta["triplets"])), meta)
    if groups is not None:
        sample["group"] = f"cluster{groups[meta['target_id']]}"
    return sample


@dataclass
class BatchInfo:
    """What a training batch is made of, beside its tensors: the record key and epoch position
    of each row (a row that replaced an undecodable sample names the sample it copies), the
    positions of every record the batch drew (undecodable ones included: they are consumed, not
    read again) and the reader's skip counts so far."""

    keys: list[str]
    positions: list[int]
    drawn: list[int]
    stats: dict
    sources: list[int] = field(default_factory=list)  # each drawn record's source (shards.mix)


@dataclass
class ReaderCounts:
    corrupt_shards: int = 0
    malformed: int = 0
    resampled: int = 0
    undecodable: int = 0
    checksum_mismatch: int = 0  # shards read whole whose bytes are not the manifest's
    _last_log: float = 0.0
    _named: set = field(default_factory=set)  # shards already named for a malformed record

    def malformed_record(self, url: str, err: Exception) -> None:
        self.malformed += 1
        first = url not in self._named  # each shard named at least once
        self._named.add(url)
        self.report("malformed record skipped", str(err), every_s=0.0 if first else 30.0)

    def report(self, what: str, detail: str, every_s: float = 30.0) -> None:
        now = time.monotonic()
        if now - self._last_log >= every_s:  # bounded rate: one line per period, with totals
            self._last_log = now
            log.warning("reader: %s (%s); totals %s", what, detail, self.as_dict())

    def as_dict(self) -> dict:
        return {
            "corrupt_shards": self.corrupt_shards,
            "malformed": self.malformed,
            "resampled": self.resampled,
            "undecodable": self.undecodable,
            "checksum_mismatch": self.checksum_mismatch,
        }


class ShardReader(IterableDataset):
    """Equal-length, deterministic, resumable training batches from shards (see module doc)."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        *,
        batch_size: int,
        collate: Callable[[list[dict]], dict],
        sampler: SamplerConfig | None = None,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        allow_pipe: bool = False,
        groups: dict[int, int] | None = None,
        augment: Callable[[dict, random.Random], dict] | None = None,
        mix: list[Source] | None = None,
        checksums: list[str] | None = None,
        sizes: list[int] | None = None,
        fetch: Fetch | None = None,
    ):
        """`mix`: several weighted sources instead of `urls` / `counts` (`sharding.mix`).
        `checksums`: each shard's manifest sha256, checked as shards are read whole; `sizes`
        (the manifest's bytes) and `fetch` (retries, cache): for remote shards."""
        self.mix = mix
        if mix is not None:
            check_sources(mix)
            if groups is not None:
                raise ValueError("shards.mix: k-means groups belong to one shard set")
            plan = epoch_shards(mix, 0, seed)
            urls, counts = plan.urls, plan.counts
        if len(urls) != len(counts):
            raise ValueError("one sample count per shard URL is needed")
        bad = [u for u in urls if u.startswith("pipe:") and not allow_pipe]
        if bad:
            open_shard(bad[0], allow_pipe)  # raises the clear error before any worker starts
        self.urls, self.counts = list(urls), list(counts)
        self.checksums = plan.checksums if mix is not None else checksums
        self.sizes = plan.sizes if mix is not None else sizes
        self.fetch = fetch or Fetch()
        self.shard_source = plan.source if mix is not None else []
        self.batch_size, self.collate = batch_size, collate
        self.rank, self.world = rank, world
        self.sampler = sampler or SamplerConfig()
        self.seed, self.allow_pipe = seed, allow_pipe
        self.groups = groups  # target_id -> k-means cluster, replaces the packed group key
        self.augment = augment  # (batch, rng) -> batch, after collate (training only)
        self.epoch, self.start_batch, self.num_workers = 0, 0, 1
        self.excluded = np.zeros(0, dtype=np.int64)
        if rank == 0 and self.sampler.buffer < 8 * batch_size:
            # a shard's records meet again in later epochs' batches at about batch / buffer
            # (bench/mixing_bench.py: 3-4x uniform on 2 ranks at 1,024; 1.1x at 8x the batch)
            log.warning(
                "sampler.buffer %d is under 8x the per-rank batch %d: in-batch negatives repeat "
                "across epochs more than under a uniform shuffle; consider sampler.buffer=%d",
                self.sampler.buffer,
                batch_size,
                8 * batch_size,
            )

    def set_position(
        self, epoch: int, start_batch: int = 0, num_workers: int = 1, excluded=()
    ) -> None:
        """Call before creating the DataLoader iterator: epoch, batches of it already consumed
        by this rank, the DataLoader's worker count (0 counts as 1), and the positions of the
        epoch's records left out of its layout (consumed before the ranks or workers changed)."""
        self.epoch, self.start_batch, self.num_workers = epoch, start_batch, max(1, num_workers)
        self.excluded = np.unique(np.asarray(excluded, dtype=np.int64))
        if self.mix is not None:  # the epoch's shards: a function of (seed, epoch)
            plan = epoch_shards(self.mix, epoch, self.seed)
            self.urls, self.counts, self.shard_source = plan.urls, plan.counts, plan.source
            self.checksums, self.sizes = plan.checksums, plan.sizes

    def batches_per_epoch(self) -> int:
        """Batches this rank yields in the epoch (the same on every rank)."""
        per_rank = (sum(self.counts) - len(self.excluded)) // (self.world * self.batch_size)
        if per_rank == 0 and not len(self.excluded):  # a re-split epoch's rest may be < 1 batch
            raise ValueError(
                f"{sum(self.counts)} samples over {self.world} ranks leave less than one batch "
                f"of {self.batch_size} per rank: use fewer ranks or a smaller batch"
            )
        return per_rank

    def _worker_start(self, worker: int) -> int:
        """Where loader worker `worker`'s share starts among the rank's batches of the epoch: as
        even as whole batches allow, the first workers one more (the DataLoader's round robin
        from worker 0 then skips the others once they are done, so batch k still comes from
        worker k % W)."""
        q, r = divmod(self.batches_per_epoch(), self.num_workers)
        return worker * q + min(worker, r)

    def worker_batches(self, worker: int) -> int:
        """Batches of the rank's epoch that loader worker `worker` yields."""
        return self._worker_start(worker + 1) - self._worker_start(worker)

    def _slot_range(self, worker: int) -> tuple[list[int], Sequence[int]]:
        """The epoch's shard order and the (sorted) positions of this rank's worker's records:
        each rank a contiguous range of whole batches, cut into one range per worker."""
        order = list(range(len(self.urls)))
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        rank_start = self.rank * self.batches_per_epoch()
        start = (rank_start + self._worker_start(worker)) * self.batch_size
        stop = (rank_start + self._worker_start(worker + 1)) * self.batch_size
        if not len(self.excluded):
            return order, range(start, stop)
        rest = np.setdiff1d(np.arange(sum(self.counts)), self.excluded, assume_unique=True)
        return order, rest[start:stop].tolist()

    def _range(
        self, order: list[int], positions: Sequence[int], on_error, on_mismatch=None
    ) -> Iterator[tuple]:
        """(position, record) at `positions` (sorted) of the epoch's concatenated shard sequence;
        a shard read to its end is checked against its manifest checksum, when known."""
        offset = 0
        for idx in order:
            n = self.counts[idx]
            lo, hi = bisect_left(positions, offset), bisect_left(positions, offset + n)
            if lo < hi:
                wanted, last = set(positions[lo:hi]), positions[hi - 1]
                sha = self.checksums[idx] if self.checksums else None
                size = self.sizes[idx] if self.sizes else None
                shard = read_shard(
                    self.urls[idx], self.allow_pipe, on_error, sha, on_mismatch, size, self.fetch
                )
                for pos, record in enumerate(shard, offset):
                    if pos > last:
                        break
                    if pos in wanted:
                        if self.mix is not None:
                            record["__source__"] = self.shard_source[idx]
                        yield pos, record
            offset += n

    def _records(
        self, order: list[int], positions: Sequence[int], counts: ReaderCounts
    ) -> Iterator[tuple[int, dict, dict]]:
        """Exactly `len(positions)` well-formed (position, record, metadata): the slot's records,
        then, when bad shards or records lost some, records read on from the slot's first
        position round the whole epoch sequence (counted as `resampled`)."""

        def on_error(url, err):
            counts.corrupt_shards += 1
            counts.report("corrupt shard", f"{url}: {err}", every_s=0.0)

        def on_mismatch(url):
            counts.checksum_mismatch += 1
            counts.report(
                "shard changed since packing",
                f"{url}: its sha256 is not the manifest's (`launch/shard.py verify` checks all)",
                every_s=0.0,
            )

        def valid(records):
            for pos, record in records:
                try:
                    yield pos, record, fmt.record_meta(record)
                except fmt.RecordError as err:
                    counts.malformed_record(record.get("__url__", "?"), err)

        length, produced = len(positions), 0
        for triple in valid(self._range(order, positions, on_error, on_mismatch)):
            yield triple
            produced += 1
        total, first = sum(self.counts), positions[0] if length else 0
        while produced < length:
            counts.report("resampling", f"{length - produced} records short")
            before = produced
            around = chain(
                self._range(order, range(first, total), on_error, on_mismatch),
                self._range(order, range(0, first), on_error, on_mismatch),
            )
            for triple in valid(around):
                counts.resampled += 1
                yield triple
                produced += 1
                if produced == length:
                    return
            if produced == before:
                raise RuntimeError(f"no readable record in any of the {len(self.urls)} shards")

    def _from_source(self, sample: dict, record: dict) -> dict:
        """A mixed source's sample: its target id and group made distinct across sources."""
        if self.mix is None:
            return sample
        source = record["__source__"]
        sample["source"] = source
        sample["target_id"] = source * TARGET_ID_STRIDE + int(sample["target_id"])
        sample["targets"] = [source * TARGET_ID_STRIDE + int(t) for t in sample["targets"]]
        sample["group"] = f"{self.mix[source].name}:{sample['group']}"
        return sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers round-robin starting at worker 0; after
        # resuming at batch `start_batch`, loader worker w plays the part of the worker whose
        # turn that was, so the batch order continues exactly.
        worker = (loader_worker + self.start_batch) % workers
        if workers != self.num_workers:
            raise RuntimeError(
                f"set_position(num_workers={workers}) before iterating (got {self.num_workers})"
            )
        slot = self.rank * workers + worker
        order, positions = self._slot_range(worker)
        my_batches = self.worker_batches(worker)
        skip = max(0, (self.start_batch - worker + workers - 1) // workers)
        counts = ReaderCounts()
        rng = random.Random(f"{self.seed}-{self.epoch}-{slot}-draw")
        drawn = (
            self._from_source({**draw_triplet(r, rng, self.groups, meta), "pos": pos}, r)
            for pos, r, meta in self._records(order, positions, counts)
        )
        buffer = max(self.sampler.buffer, self.batch_size)
        composer = BatchComposer(
            replace(self.sampler, buffer=buffer),
            self.batch_size,
            seed=f"{self.seed}-{self.epoch}-{slot}-compose",
        )
        for index, raw_batch in enumerate(composer(drawn)):
            if index >= my_batches:
                break
            if index < skip:
                continue
            rows = []
            for raw in raw_batch:
                try:
                    rows.append((raw, fmt.decode_sample(raw)))
                except (fmt.ImageDecodeError, fmt.RecordError) as err:
                    counts.undecodable += 1
                    counts.report("undecodable sample", f"{raw['key']}: {err}")
            if not rows:
                raise RuntimeError(f"no decodable sample in batch {index} of slot {slot}")
            # keep the batch size (ranks stay in step): each lost row becomes a copy of another
            # row of the batch, drawn per batch so a resumed run replays it
            pick = random.Random(f"{self.seed}-{self.epoch}-{slot}-{index}-replace")
            decoded = list(rows)
            while len(rows) < len(raw_batch):
                rows.append(pick.choice(decoded))
            batch = self.collate([sample for _, sample in rows])
            if self.augment is not None:  # seeded per batch: a resumed run replays it exactly
                self.augment(
                    batch, random.Random(f"{self.seed}-{self.epoch}-{slot}-{index}-augment")
                )
            info = BatchInfo(
                keys=[raw["key"] for raw, _ in rows],
                positions=[raw["pos"] for raw, _ in rows],
                drawn=[raw["pos"] for raw in raw_batch],
                stats={"worker": worker, **counts.as_dict()},
                sources=[raw.get("source", 0) for raw in raw_batch],
            )
            yield batch, info
