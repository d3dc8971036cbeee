"""Checkpoint files: how a run's state is laid out on disk and verified
(`train.checkpointer.Checkpointer` is what the loop uses). On disk, one directory per tag: DeepSpeed's own files (model, optimizer, schedule), the
parts every rank shares (`train_state.pt`, one entry per part), each rank's own part (its RNG,
`rng_rank<r>.pt`), the config it was trained with (`config.json`) and a COMPLETE marker written
by rank 0 after every rank has saved, listing the size and sha256 of every file. A checkpoint
without the marker is ignored on resume; one whose files do not match it (truncated, corrupt,
missing) is skipped with a warning naming the file, and the newest intact one is used.

A job resumed on another number of data-parallel ranks reads DeepSpeed's per-rank optimizer
partitions through its universal checkpoint format (converted once, into `<tag>/universal`).

Nothing here runs code from a file: our files and DeepSpeed's own loader (it is handed
`load_file`) use `torch.load(weights_only=True)`. DeepSpeed's converter and universal loader
call `torch.load(weights_only=False)` themselves; every file they will read is first read by
`load_file` (`check_weights_only`), so a crafted one is refused before they open it."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
import torch.distributed as dist

from train.distributed import broadcast_from_rank0

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.json"
UNIVERSAL = "universal"  # sub-directory: the tag in DeepSpeed's universal format


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be (safely) loaded; the message names the file."""


def _deepspeed_globals() -> list:
    """The plain-data classes DeepSpeed pickles into its optimizer files (no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path: str | Path, map_location=None):
    """`torch.load` that cannot run code: tensors, plain types and DeepSpeed's data classes."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((ln.strip() for ln in str(err).splitlines() if "Unsupported" in ln), "")
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain data ({reason})"
        ) from None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_file(ckpt_dir: str | Path, tag: str) -> Path:
    return Path(ckpt_dir) / tag / f"rng_rank{_rank()}.pt"


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{COMPLETE}"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _inventory(tag_dir: Path) -> dict:
    return {
        str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def save_checkpoint(
    engine,
    ckpt_dir: str | Path,
    step: int,
    shared: dict,
    own: dict,
    keep: int = 2,
    config: dict | None = None,
) -> str:
    """Every rank calls this with its own part (`own`); rank 0 writes the `shared` one, the
    config and, after every rank is done, the COMPLETE marker, then points `latest` at the tag
    (DeepSpeed's own `latest`, written as soon as its rank 0 is done, could name a checkpoint
    another rank never finished). A full disk is a `CheckpointError` saying so: the partial tag
    is removed, the previous checkpoint stays the newest. Returns the tag."""
    tag = step_tag(step)
    tag_dir = Path(ckpt_dir) / tag
    if _rank() == 0 and tag_dir.exists():  # a damaged one of the same step: no stale files
        shutil.rmtree(tag_dir)
    _barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        torch.save(own, rank_file(ckpt_dir, tag))
        if _rank() == 0:
            torch.save(shared, tag_dir / STATE_FILE)
            if config is not None:
                (tag_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    except (OSError, RuntimeError) as err:
        raise _unless_disk_full(err, ckpt_dir, tag_dir) from None
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        marker = {"step": step, "world": world, "files": _inventory(tag_dir)}
        try:
            _write_atomically(tag_dir / COMPLETE, json.dumps(marker, indent=1))
            _write_atomically(Path(ckpt_dir) / "latest", tag)  # only ever a complete tag
        except OSError as err:
            raise _unless_disk_full(err, ckpt_dir, tag_dir) from None
        for old in complete_tags(ckpt_dir)[:-keep] if keep > 0 else []:
            (Path(ckpt_dir) / old / COMPLETE).unlink()  # first: a half-deleted tag is not complete
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    _barrier()
    return tag


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # whole or absent, even if killed here


# how a full disk (or quota) reads: the errno, or PyTorch's stream writer's words for it
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_DISK_WORDS = ("unexpected pos", "file write failed", "No space left")


def _unless_disk_full(err: Exception, ckpt_dir, tag_dir: Path) -> Exception:
    """`err` itself, unless it says the disk is full: then the partial tag is removed (the
    space it took comes back) and a one-line `CheckpointError` says what is left."""
    full = isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS
    if not (full or any(w in str(err) for w in FULL_DISK_WORDS)):
        return err
    (tag_dir / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)
    previous = complete_tags(ckpt_dir)
    kept = (
        f"{Path(ckpt_dir) / previous[-1]} is intact and `latest` names it"
        if previous
        else "no earlier checkpoint"
    )
    free = shutil.disk_usage(ckpt_dir).free / 2**20
    said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"checkpoint {tag_dir} not written: the disk is full ({free:.0f} MiB free on "
        f"{ckpt_dir}); {kept} ({said})"
    )


def clear(ckpt_dir: str | Path) -> None:
    """`train.resume=none`: rank 0 moves the previous run's checkpoints aside to
    `checkpoints.replaced-<time>` (resuming them later, or keeping them beside the new ones,
    would mix two runs; deleting them would lose a run to a typo)."""
    ckpt_dir = Path(ckpt_dir)
    if _rank() == 0 and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        aside = ckpt_dir.with_name(f"{ckpt_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(aside)
        log.warning("train.resume=none: the previous run's checkpoints moved to %s", aside)
    _barrier()


def read_marker(tag_dir: str | Path) -> dict:
    path = Path(tag_dir) / COMPLETE
    try:
        marker = json.loads(path.read_text())
        if not isinstance(marker, dict):
            raise ValueError("not a JSON object")
        return marker
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


def damaged_files(tag_dir: str | Path) -> list[str]:
    """What does not match the COMPLETE marker: one line per file ([] = intact)."""
    tag_dir = Path(tag_dir)
    try:
        files = read_marker(tag_dir).get("files")
    except CheckpointError as err:
        return [str(err)]
    if files is None:  # saved before checksums were recorded: nothing to compare
        return []
    bad = []
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            bad.append(f"{path}: {path.stat().st_size} bytes, {want['size']} when saved")
        elif _sha256(path) != want["sha256"]:
            bad.append(f"{path}: content differs from the checksum saved with it")
    return bad


def newest_intact(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint whose files match their checksums. Rank 0 checks (and
    logs a warning naming the bad files of each one it skips); every rank gets its answer."""
    found = None
    if _rank() == 0:
        for tag in reversed(complete_tags(ckpt_dir)):
            bad = damaged_files(Path(ckpt_dir) / tag)
            if not bad:
                found = tag
                break
            log.warning(
                "checkpoint %s is damaged, skipped: %s", Path(ckpt_dir) / tag, "; ".join(bad)
            )
    return broadcast_from_rank0(found)


def read_state(ckpt_dir: str | Path, tag: str) -> dict:
    """The shared part of the training state (readable before the engine is built)."""
    path = Path(ckpt_dir) / tag / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the training state of this checkpoint)")
    return load_file(path)


def saved_world(ckpt_dir: str | Path, tag: str) -> int:
    return int(read_marker(Path(ckpt_dir) / tag).get("world", 0))


def check_weights_only(paths) -> None:
    """Read each file with `load_file` (raises `CheckpointError` naming a crafted one): what
    DeepSpeed then opens with its own unrestricted `torch.load` holds only plain data."""
    for path in paths:
        load_file(path, map_location="cpu")


def needs_universal(ckpt_dir: str | Path, tag: str, world: int) -> bool:
    """The optimizer state is partitioned over the saving ranks (ZeRO, or the bf16 optimizer)
    and this job has another number of them."""
    tag_dir = Path(ckpt_dir) / tag
    partitioned = any(tag_dir.glob("*optim_states.pt"))
    return partitioned and saved_world(ckpt_dir, tag) not in (0, world)  # 0: not recorded


def to_universal(ckpt_dir: str | Path, tag: str) -> str:
    """Convert `tag` to DeepSpeed's universal format once (rank 0; the others wait); returns the
    tag to load with `checkpoint.load_universal`."""
    out = Path(ckpt_dir) / tag / UNIVERSAL
    done = out / "DONE"
    if _rank() == 0 and not done.exists():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(Path(ckpt_dir) / tag),
            output_folder=str(out),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        check_weights_only(sorted((Path(ckpt_dir) / tag).glob("*.pt")))
        with redirect_stdout(_LogWriter()):
            ds_to_universal(args)
        (Path(ckpt_dir) / "latest_universal").unlink(missing_ok=True)  # the converter's pointer
        done.write_text("")
    _barrier()
    return f"{tag}/{UNIVERSAL}"


class _LogWriter:
    """The converter prints progress; keep it at debug level."""

    def write(self, text: str) -> None:
        if text.strip():
            log.debug("ds_to_universal: %s", text.strip())

    def flush(self) -> None:
        pass


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str) -> None:
    """Restore the engine: model, optimizer, schedule (`tag` may be a universal tag)."""
    engine.checkpoint_engine.load = load_file  # DeepSpeed's own loader unpickles anything
    if tag.endswith(f"/{UNIVERSAL}"):  # read by DeepSpeed's universal loader, unrestricted
        check_weights_only(sorted((Path(ckpt_dir) / tag).rglob("*.pt")))
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"{Path(ckpt_dir) / tag}: DeepSpeed found no checkpoint there")
