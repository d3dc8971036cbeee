"""Whether a checkpoint's settings still hold for the job that resumes it.

- A checkpoint carries the config it was trained with; resuming it under settings that change
  the training (model, data, loss, optimizer, schedule, ...) would silently continue the old
  model as if it were the new one, so that is refused, naming the keys. Settings that only say
  where and how often things are written or evaluated, how long to train, and how data is loaded
  may differ; they are listed in the log."""

from __future__ import annotations

import json
from pathlib import Path

from configs import ConfigError
from configs.schema import Config, marked, to_dict
from train import checkpoint as ckpt
from train.tracking import flatten

# the keys a resumed run may change: the schema's fields marked RESUME_FREE
FREE = frozenset(marked(Config, "resume_free"))


_MISSING = object()


class SettingsChanged(ConfigError):
    """The settings differ from those the checkpoint to resume was trained with."""


def is_free(key: str) -> bool:
    return key in FREE


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
