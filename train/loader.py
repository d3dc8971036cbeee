"""The training data: the shard reader, its DataLoader and the whole data position.

`TrainLoader` owns where the run is in its data, as torchtitan's stateful loader does: the
epoch, the micro-batches of it this rank has consumed, and the epoch positions of the records
every rank has consumed (`seen`). Its `state_dict` / `load_state_dict` are what a checkpoint
keeps of the data; batches leave it as tensors only.

The reader's position is a layout of the epoch's records cut for `world` ranks x `workers`
loader workers (`sharding.reader.ShardReader`), which another job size cannot continue. So a
job resumed on another number of ranks or workers cuts a new layout of the epoch's records minus
those seen: nothing is repeated, and what the new split cannot fill (less than a batch per slot)
waits for the next epoch, like the epoch's tail. Positions are kept rather than a sample count
because batch composition (HNS/FS, buffered shuffles) does not consume records in order.

`RunShape` is the job's size, computed once from the config, the world and the loader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from configs.schema import Config
from sharding.reader import ShardReader
from train.distributed import gather
from train.stop import ignore_stop_signals


def _positions(values=()) -> torch.Tensor:
    return torch.as_tensor(list(values) if not torch.is_tensor(values) else values).long()


class TrainLoader:
    """Batches (dicts of tensors) of the rest of the current epoch, from the saved position."""

    def __init__(self, reader: ShardReader, workers: int, seed: int, pin_memory: bool = False):
        self.reader, self.workers, self.seed, self.pin_memory = reader, workers, seed, pin_memory
        self.epoch, self.batch_in_epoch = 0, 0
        self.excluded = _positions()  # left out of this epoch's layout (consumed before a re-split)
        self.seen = _positions()  # consumed by every rank, as of the last `state_dict`
        self.consumed: list[int] = []  # this rank's since then
        self.moved: tuple[int, int] | None = None  # the saved (ranks, workers), when re-split
        self.stats: dict = {}  # the reader's skip counts, as of the last batch
        self.source_rows: dict[int, int] = {}  # rows drawn per mixed source this epoch (logged)
        self.last_keys: list[str] = []  # the last batch's records (what a warning names)
        self._place()

    @property
    def layout(self) -> tuple[int, int]:
        return self.reader.world, max(1, self.workers)

    def _place(self) -> None:
        self.reader.set_position(self.epoch, self.batch_in_epoch, self.workers, self.excluded)

    def batches_per_epoch(self) -> int:
        """Micro-batches per rank in the current epoch (a re-split epoch has fewer)."""
        self._place()
        return self.reader.batches_per_epoch()

    def full_epoch_batches(self) -> int:
        """Micro-batches per rank in an epoch of the plain layout."""
        self.reader.set_position(0, 0, self.workers)
        try:
            return self.reader.batches_per_epoch()
        finally:
            self._place()

    def __iter__(self):
        self._place()
        # own generator: starting workers must not draw from the global RNG (dropout), or a
        # resumed run, which starts its loader at another point, would diverge
        seeded = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        loader = DataLoader(
            self.reader,
            batch_size=None,
            num_workers=self.workers,
            generator=seeded,
            pin_memory=self.pin_memory,
            worker_init_fn=ignore_stop_signals,  # the stop is the main process's (train.stop)
        )
        for batch, info in loader:
            self.batch_in_epoch += 1
            self.last_keys = info.keys  # what a warning about this batch names
            self.consumed += info.drawn
            self.stats = info.stats
            for source in info.sources:
                self.source_rows[source] = self.source_rows.get(source, 0) + 1
            yield batch

    def next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.excluded, self.seen, self.consumed = _positions(), _positions(), []
        self.source_rows = {}

    def shares(self) -> dict[str, float]:
        """Each mixed source's share of the rows this rank drew in the epoch so far."""
        mix, total = self.reader.mix or [], sum(self.source_rows.values())
        return {s.name: self.source_rows.get(i, 0) / max(1, total) for i, s in enumerate(mix)}

    def state_dict(self) -> dict:
        """Every rank calls this (it gathers what each consumed; ranks consume equal counts).
        Repeats are kept in `seen`, so that a record consumed twice would show."""
        mine = gather(_positions(self.consumed))
        self.seen, self.consumed = torch.sort(torch.cat([self.seen, mine])).values, []
        world, workers = self.layout
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world": world,
            "workers": workers,
            "excluded": self.excluded,
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict) -> None:
        """The saved position; on another ranks x workers layout the rest of the epoch is cut
        anew without the records seen (`moved` then holds the saved layout)."""
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.excluded, self.seen, self.consumed = state["excluded"], state["seen"], []
        saved = (int(state["world"]), int(state["workers"]))
        self.moved = None if saved == self.layout else saved
        if self.moved:
            self.excluded, self.batch_in_epoch = torch.unique(self.seen), 0
        self._place()

    def describe_move(self) -> str | None:
        """The log line of a re-split (None when the layout is the saved one)."""
        if not self.moved:
            return None
        total, seen = sum(self.reader.counts), len(self.excluded)
        batches = self.batches_per_epoch()
        used = batches * self.reader.batch_size * self.reader.world
        return (
            f"ranks x loader workers changed: {self.moved[0]} x {self.moved[1]} -> "
            f"{self.layout[0]} x {self.layout[1]}; epoch {self.epoch}: {seen} of {total} records "
            f"consumed, the other {total - seen} split anew over the new ranks ({batches} batches "
            f"per rank, {total - seen - used} left for the next epoch)"
        )


@dataclass(frozen=True)
class RunShape:
    """The job's size, fixed for the run: ranks, per-rank micro-batch, accumulation, optimizer
    steps per (plain) epoch and in all."""

    world: int
    per_rank_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int

    @property
    def samples_per_step(self) -> int:
        return self.world * self.per_rank_batch * self.grad_accum


def run_shape(cfg: Config, world: int, per_rank_batch: int, loader: TrainLoader, step: int):
    """The shape of a job at optimizer step `step` with `loader` at its (restored) position:
    the steps left in this epoch (a re-split epoch has fewer), then whole epochs; or
    `train.max_steps`."""
    accum = cfg.train.grad_accum
    per_epoch = loader.full_epoch_batches() // accum
    left_now = (loader.batches_per_epoch() - loader.batch_in_epoch) // accum
    total = cfg.train.max_steps or (
        step + left_now + (cfg.train.epochs - loader.epoch - 1) * per_epoch
    )
    return RunShape(world, per_rank_batch, accum, per_epoch, total)
