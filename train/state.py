"""The training state: everything a resumed run needs besides the DeepSpeed engine (model,
optimizer, schedule), as one object that `train.checkpoint` saves and restores whole (as
torchtitan's trainer registers its `TrainState` with its checkpointer).

`state_dict()` holds only tensors and plain Python types, so checkpoints load with
`torch.load(weights_only=True)`: nothing in a file can run code."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from train.queue import MomentumEncoder, TargetQueue


@dataclass
class TrainState:
    queue: TargetQueue | None = None
    momentum: MomentumEncoder | None = None
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` consumed: the reader's position
    run_id: str | None = None  # the MLflow run a resumed job continues

    # what differs between ranks (saved per rank); the rest is the same on every rank
    PER_RANK = ("rng",)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "run_id": self.run_id,
            "queue": self.queue.state_dict() if self.queue is not None else None,
            "momentum": self.momentum.state_dict() if self.momentum is not None else None,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch, self.run_id = int(state["batch_in_epoch"]), state["run_id"]
        for name, part in (("queue", self.queue), ("momentum", self.momentum)):
            if part is None:
                continue
            if state[name] is None:
                raise ValueError(f"the checkpoint has no {name} state, the config needs one")
            part.load_state_dict(state[name])
        set_rng_state(state["rng"])


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
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"], "gauss": n["gauss"],
    })  # fmt: skip
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
