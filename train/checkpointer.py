"""The run's checkpointer: handed every stateful part once, it saves them, verifies, falls back
and restores them (as torchtitan's checkpointer is handed the trainer's state).

Parts are anything with `state_dict()` / `load_state_dict()`. The shared ones (the same on every
rank: training state, data loader, queue, EMA copy) go into one file, each rank's own RNG into
its own file, the engine into DeepSpeed's directory (`train.checkpoint` has the layout).
Restoring takes two calls because the engine is built from what the checkpoint says (the run's
length, whether its optimizer state must be read in DeepSpeed's universal format): `restore`
before the engine is built picks the checkpoint, checks its settings and loads the shared parts;
`restore_engine` loads the engine and, when the job has the ranks that saved it, each rank's RNG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from configs.schema import Config, to_dict
from train import checkpoint as files
from train import resume
from train.state import RNGState

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """The checkpoint a job continues and what differs from the job that saved it."""

    tag: str
    same_ranks: bool  # this job has the ranks that saved it (their RNG states apply)
    universal: bool  # the optimizer state is partitioned over other ranks: load it universally
    free: list[str] = field(default_factory=list)  # settings changed that may change


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, cfg: Config, parts: dict, world: int):
        """`parts`: name -> stateful object shared by every rank (None entries are left out)."""
        self.dir, self.cfg, self.world = Path(ckpt_dir), cfg, world
        self.parts = {name: part for name, part in parts.items() if part is not None}
        self.rng = RNGState()
        self.engine = None
        self.restored: Restored | None = None

    def restore(self) -> Restored | None:
        """Every rank, before the engine is built: the checkpoint `train.resume` asks for (auto:
        the newest intact one), refused if trained with settings that change the training, its
        shared parts loaded. None when the job starts afresh."""
        if self.cfg.train.resume == "none":
            files.clear(self.dir)
        tag = files.newest_intact(self.dir) if self.cfg.train.resume == "auto" else None
        if tag is None:
            return None
        saved = resume.saved_settings(self.dir, tag)
        free = resume.check_settings(self.cfg, saved[1], self.dir / tag) if saved else []
        state = files.read_state(self.dir, tag)
        for name, part in self.parts.items():
            if name not in state:
                raise files.CheckpointError(
                    f"{self.dir / tag / files.STATE_FILE}: has no {name} state, the config needs one"
                )
            part.load_state_dict(state[name])
        saved_world = files.saved_world(self.dir, tag)
        self.restored = Restored(
            tag,
            same_ranks=saved_world in (0, self.world),
            universal=files.needs_universal(self.dir, tag, self.world),
            free=free,
        )
        return self.restored

    def restore_engine(self, engine) -> None:
        """Keep `engine` for saving; load it (and this rank's RNG) if `restore` found a tag."""
        self.engine = engine
        if self.restored is None:
            return
        tag = self.restored.tag
        if self.restored.universal:
            tag = files.to_universal(self.dir, tag)
        files.load_checkpoint(engine, self.dir, tag)
        if self.restored.same_ranks:
            path = files.rank_file(self.dir, self.restored.tag)
            if not path.is_file():
                raise files.CheckpointError(
                    f"{path}: missing (this rank's part of the training state)"
                )
            self.rng.load_state_dict(files.load_file(path)["rng"])

    def save(self, step: int) -> str:
        """Every rank calls this at the same optimizer step; returns the tag."""
        shared = {name: part.state_dict() for name, part in self.parts.items()}
        return files.save_checkpoint(
            self.engine,
            self.dir,
            step,
            shared=shared,
            own={"rng": self.rng.state_dict()},
            keep=self.cfg.train.keep_checkpoints,
            config=to_dict(self.cfg),
        )

    def describe(self) -> list[str]:
        """What the log says of the restored checkpoint."""
        if self.restored is None:
            return []
        lines = [f"resumed from {self.dir / self.restored.tag}"]
        if self.restored.free:
            lines.append(
                "settings changed since that checkpoint (they do not change the training): "
                + "; ".join(self.restored.free)
            )
        if self.restored.universal:
            lines.append("optimizer state re-partitioned through DeepSpeed's universal checkpoint")
        return lines
