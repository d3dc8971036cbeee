"""The training state: everything a resumed run needs besides the DeepSpeed engine (model,
optimizer, schedule), as one object that `train.checkpoint` saves and restores whole (as
torchtitan's trainer registers its `TrainState` with its checkpointer).

`state_dict()` holds only tensors and plain Python types, so checkpoints load with
`torch.load(weights_only=True)`: nothing in a file can run code.

The data position is (epoch, micro-batches consumed per rank) inside a layout of the epoch's
records cut for `world` ranks x `workers` loader workers (`sharding.reader.ShardReader`). A job
resumed on another number of ranks or workers cannot continue that layout: `place` then cuts a
new one from the records the epoch has not consumed yet (`seen`, the positions every rank
consumed, gathered at each checkpoint), so no record is repeated or skipped."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from train.queue import MomentumEncoder, TargetQueue


@dataclass
class TrainState:
    queue: TargetQueue | None = None
    momentum: MomentumEncoder | None = None
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` consumed: the reader's position
    run_id: str | None = None  # the MLflow run a resumed job continues
    world: int = 0  # ranks the epoch's layout was cut for (0: not placed yet)
    workers: int = 0  # loader workers per rank the layout was cut for
    excluded: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    seen: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    consumed: list[int] = field(default_factory=list)  # this rank's, since the last gather

    # what differs between ranks (saved per rank); the rest is the same on every rank
    PER_RANK = ("rng",)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "run_id": self.run_id,
            "world": self.world,
            "workers": self.workers,
            "excluded": self.excluded,
            "seen": self.seen,
            "queue": self.queue.state_dict() if self.queue is not None else None,
            "momentum": self.momentum.state_dict() if self.momentum is not None else None,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch, self.run_id = int(state["batch_in_epoch"]), state["run_id"]
        self.world, self.workers = int(state["world"]), int(state["workers"])
        self.excluded, self.seen, self.consumed = state["excluded"], state["seen"], []
        for name, part in (("queue", self.queue), ("momentum", self.momentum)):
            if part is None:
                continue
            if state[name] is None:
                raise ValueError(f"the checkpoint has no {name} state, the config needs one")
            part.load_state_dict(state[name])
        if "rng" in state:  # absent when the job resumes on other ranks (their RNG is fresh)
            set_rng_state(state["rng"])

    def gather_consumed(self) -> None:
        """Add every rank's consumed positions to `seen` (all ranks call this, before saving).
        Repeats are kept, so that a record consumed twice would show."""
        mine = torch.tensor(self.consumed, dtype=torch.long)
        parts = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        self.seen = torch.sort(torch.cat([self.seen, *parts])).values
        self.consumed = []

    def next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.excluded = self.seen = torch.zeros(0, dtype=torch.long)
        self.consumed = []

    def place(self, world: int, workers: int) -> tuple[int, int] | None:
        """Fit the data position to `world` ranks x `workers` loader workers. When they differ
        from the layout's, the rest of the epoch gets a new layout without the records seen so
        far; returns the old (world, workers) then, else None."""
        workers = max(1, workers)
        old = (self.world, self.workers)
        self.world, self.workers = world, workers
        if old in ((world, workers), (0, 0)):
            return None
        self.excluded, self.batch_in_epoch = torch.unique(self.seen), 0
        return old


def rng_state() -> dict:
    """This process's generators (Python, numpy, torch CPU, this rank's CUDA device) as tensors
    and plain types."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": torch.tensor(mt), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
