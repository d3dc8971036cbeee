"""What a run keeps besides the engine (model, optimizer, schedule) and the data position
(`train.loader.TrainLoader`): the optimizer steps done and the MLflow run a resumed job
continues (`TrainState`), and each process's random generators (`RNGState`, saved per rank).
`train.checkpoint.Checkpointer` saves and restores them with the other stateful parts.

Every `state_dict()` holds only tensors and plain Python types, so checkpoints load with
`torch.load(weights_only=True)`: nothing in a file can run code."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    run_id: str | None = None  # the MLflow run a resumed job continues
    # a validation was due at `step` when a stop signal came: the resumed job runs it first
    validation_due: bool = False
    nonfinite_skipped: int = 0  # micro-batches skipped for a NaN / Inf loss (train.nonfinite)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "run_id": self.run_id,
            "validation_due": self.validation_due,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.run_id = int(state["step"]), state["run_id"]
        # absent from older checkpoints
        self.validation_due = bool(state.get("validation_due", False))
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))


class RNGState:
    """This process's generators as a stateful part (per rank: ranks draw different dropout)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


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
