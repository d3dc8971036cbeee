"""Resuming a job: which checkpoint, whether its settings still hold, what changed.

- The newest complete checkpoint whose files match their checksums (`train.checkpoint`).
- A checkpoint carries the config it was trained with; resuming it under settings that change
  the training (model, data, loss, optimizer, schedule, ...) would silently continue the old
  model as if it were the new one, so that is refused, naming the keys. Settings that only say
  where and how often things are written or evaluated, how long to train, and how data is loaded
  may differ; they are listed in the log.
- Another number of ranks or loader workers: the data position is re-split (`TrainState.place`)
  and, for an optimizer state partitioned over the old ranks, DeepSpeed loads the checkpoint in
  its universal format."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from configs import ConfigError
from configs.schema import Config, to_dict
from train import checkpoint as ckpt
from train.state import TrainState
from train.tracking import flatten

# keys (or key prefixes ending in ".") a resumed run may change
FREE = (
    "tracking.",
    "eval.",
    "train.out_dir",
    "train.resume",
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "shards.loader_workers",
    "shards.workers",
    "data.synth.workers",
    "deepspeed.timeout_s",
    "train.chunk_size",  # the gradient cache gives the same steps: resume on a smaller device
)


_MISSING = object()


class SettingsChanged(ConfigError):
    """The settings differ from those the checkpoint to resume was trained with."""


def is_free(key: str) -> bool:
    return any(key.startswith(f) if f.endswith(".") else key == f for f in FREE)


def differences(saved: dict, now: dict) -> dict[str, tuple]:
    """Flat key -> (saved value, current value) for every key whose value differs."""
    a, b = flatten(saved), flatten(now)
    return {
        k: (a.get(k, _MISSING), b.get(k, _MISSING))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    }


def _both(values: tuple) -> bool:
    return _MISSING not in values


def _show(old, new) -> str:
    def one(v):
        return "(absent)" if v is _MISSING else repr(v)

    return f"{one(old)} -> {one(new)}"


def check_settings(cfg: Config, saved: dict, where: str | Path) -> list[str]:
    """Raise `SettingsChanged` listing the keys that change the training; return the free
    differences (for the log) as "key: old -> new"."""
    diff = differences(saved, to_dict(cfg))
    if cfg.train.global_batch_size:  # the per-rank batch follows the world size
        diff.pop("train.batch_size", None)
    # a key only one side has came or went with a code change (its default keeps the behaviour)
    changed = [f"{k}: {_show(*v)}" for k, v in diff.items() if not is_free(k) and _both(v)]
    if changed:
        raise SettingsChanged(
            f"{where} was trained with other settings ({'; '.join(changed)}). Resuming would "
            "continue that model under the new settings. To train with them, use a fresh "
            "train.out_dir (launch/demo.py: --out DIR); train.resume=none starts over in this "
            "one, moving its checkpoints aside."
        )
    return [f"{k}: {_show(*v)}" for k, v in diff.items()]


def saved_settings(ckpt_dir: str | Path, tag: str | None = None) -> tuple[Path, dict] | None:
    """(file, config) the checkpoint `tag` (default: the newest complete one) was trained with;
    None if there is none (or it predates saved configs)."""
    tags = [tag] if tag else ckpt.complete_tags(ckpt_dir)[-1:]
    for t in tags:
        path = Path(ckpt_dir) / t / ckpt.CONFIG_FILE
        try:
            return path, json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def check_before_start(cfg: Config) -> list[str]:
    """For launchers, before any process starts: the same check against the newest complete
    checkpoint in train.out_dir (when `train.resume=auto`)."""
    if cfg.train.resume != "auto":
        return []
    found = saved_settings(Path(cfg.train.out_dir) / "checkpoints")
    if found is None:
        return []
    path, saved = found
    return check_settings(cfg, saved, f"the checkpoint {path.parent}")


@dataclass
class Resumed:
    """The checkpoint a job continues and what differs from the job that saved it."""

    ckpt_dir: Path
    tag: str
    moved: tuple[int, int] | None  # (ranks, loader workers) of the saved data layout, if changed
    universal: bool  # the optimizer state is partitioned over other ranks: load it universally
    free: list[str] = field(default_factory=list)  # settings changed that may change

    def load(self, engine, world: int) -> None:
        tag = ckpt.to_universal(self.ckpt_dir, self.tag) if self.universal else self.tag
        same_ranks = self.moved is None or self.moved[0] == world
        ckpt.load_checkpoint(engine, self.ckpt_dir, tag, same_ranks=same_ranks)

    def describe(self, state: TrainState, reader) -> list[str]:
        lines = [
            f"resumed from {self.ckpt_dir / self.tag}: step {state.step}, epoch {state.epoch}, "
            f"batch {state.batch_in_epoch}"
        ]
        if self.free:
            lines.append(
                "settings changed since that checkpoint (they do not change the "
                "training): " + "; ".join(self.free)
            )
        if self.moved:
            total, seen = sum(reader.counts), len(state.excluded)
            batches = reader.batches_per_epoch()
            used = batches * reader.batch_size * reader.world
            lines.append(
                f"ranks x loader workers changed: {self.moved[0]} x {self.moved[1]} -> "
                f"{state.world} x {state.workers}; epoch {state.epoch}: {seen} of {total} records "
                f"consumed, the other {total - seen} split anew over the new ranks ({batches} batches "
                f"per rank, {total - seen - used} left for the next epoch)"
                + (
                    "; optimizer state re-partitioned through DeepSpeed's universal checkpoint"
                    if self.universal
                    else ""
                )
            )
        return lines


def find(cfg: Config, ckpt_dir: Path, state: TrainState, world: int) -> Resumed | None:
    """Every rank calls this before the engine is built: pick the checkpoint (`train.resume`),
    check its settings, load the shared part of the training state into `state` and fit its
    data position to this job's ranks and loader workers."""
    workers = cfg.shards.loader_workers
    if cfg.train.resume == "none":
        ckpt.clear(ckpt_dir)
    tag = ckpt.newest_intact(ckpt_dir) if cfg.train.resume == "auto" else None
    if tag is None:
        state.place(world, workers)
        return None
    saved = saved_settings(ckpt_dir, tag)
    free = check_settings(cfg, saved[1], ckpt_dir / tag) if saved else []
    state.load_state_dict(ckpt.read_state(ckpt_dir, tag))
    moved = state.place(world, workers)
    universal = ckpt.needs_universal(ckpt_dir, tag, world)
    return Resumed(ckpt_dir, tag, moved, universal, free)
