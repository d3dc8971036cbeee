"""Checkpoints: DeepSpeed's own directory per tag (model, optimizer, schedule), the shared part
of the `TrainState` (`train_state.pt`), its per-rank part (`rng_rank<r>.pt`), the config it was
trained with (`config.json`), and a COMPLETE marker written by rank 0 after every rank has saved,
listing the size and sha256 of every file in the tag. A checkpoint without the marker is ignored
on resume; one whose files do not match it (truncated, corrupt, missing) is skipped with a
warning naming the file, and the newest intact one is used.

A job resumed on another number of data-parallel ranks reads DeepSpeed's per-rank optimizer
partitions through its universal checkpoint format (converted once, into `<tag>/universal`).

Every file is read with `torch.load(weights_only=True)`, DeepSpeed's included (its converter and
universal loader too): a crafted file is refused, never executed."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from configs.schema import ModelConfig
from train.state import TrainState, set_rng_state

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.json"
UNIVERSAL = "universal"  # sub-directory: the tag in DeepSpeed's universal format
_TORCH_LOAD = torch.load  # the real one (`_weights_only_torch_load` swaps torch.load for a while)


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
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
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


def _rank_file(ckpt_dir: str | Path, tag: str) -> Path:
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


def save_checkpoint(
    engine, ckpt_dir: str | Path, state: TrainState, keep: int = 2, config: dict | None = None
) -> str:
    """Every rank calls this. Returns the tag."""
    tag = f"step{state.step:08d}"
    tag_dir = Path(ckpt_dir) / tag
    if _rank() == 0 and tag_dir.exists():  # a damaged one of the same step: no stale files
        shutil.rmtree(tag_dir)
    _barrier()
    shared = state.state_dict()
    own = {k: shared.pop(k) for k in TrainState.PER_RANK}
    engine.save_checkpoint(str(ckpt_dir), tag=tag)
    torch.save(own, _rank_file(ckpt_dir, tag))
    if _rank() == 0:
        torch.save(shared, tag_dir / STATE_FILE)
        if config is not None:
            (tag_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        marker = {"step": state.step, "world": world, "files": _inventory(tag_dir)}
        tmp = tag_dir / f"{COMPLETE}.tmp"
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, tag_dir / COMPLETE)  # whole or absent, even if killed here
        for old in complete_tags(ckpt_dir)[:-keep] if keep > 0 else []:
            (Path(ckpt_dir) / old / COMPLETE).unlink()  # first: a half-deleted tag is not complete
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    _barrier()
    return tag


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
    found = [None]
    if _rank() == 0:
        for tag in reversed(complete_tags(ckpt_dir)):
            bad = damaged_files(Path(ckpt_dir) / tag)
            if not bad:
                found[0] = tag
                break
            log.warning(
                "checkpoint %s is damaged, skipped: %s", Path(ckpt_dir) / tag, "; ".join(bad)
            )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def read_state(ckpt_dir: str | Path, tag: str) -> dict:
    """The shared part of the training state (readable before the engine is built)."""
    path = Path(ckpt_dir) / tag / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the training state of this checkpoint)")
    return load_file(path)


def saved_world(ckpt_dir: str | Path, tag: str) -> int:
    return int(read_marker(Path(ckpt_dir) / tag).get("world", 0))


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's converter and universal loader call `torch.load(weights_only=False)`; inside
    this block every `torch.load` is `load_file`."""

    def safe(f, map_location=None, *args, **kwargs):
        return load_file(f, map_location=map_location)

    torch.load = safe
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


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
            num_merge_workers=1,  # in this process: the safe torch.load
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        with _weights_only_torch_load(), contextlib.redirect_stdout(_LogWriter()):
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


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, same_ranks: bool = True) -> None:
    """Restore the engine (model, optimizer, schedule; `tag` may be a universal tag) and this
    rank's RNG (only when the job has the ranks that saved it); the rest of the training state
    comes from `read_state`."""
    engine.checkpoint_engine.load = load_file  # DeepSpeed's own loader unpickles anything
    with _weights_only_torch_load():
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"{Path(ckpt_dir) / tag}: DeepSpeed found no checkpoint there")
    if same_ranks:
        own_file = _rank_file(ckpt_dir, tag.split("/")[0])
        if not own_file.is_file():
            raise CheckpointError(f"{own_file}: missing (this rank's part of the training state)")
        set_rng_state(load_file(own_file)["rng"])


def consolidated_state_dict(engine, ckpt_dir: str | Path, tag: str, zero_stage: int) -> dict:
    """Full fp32 model state on CPU (from the ZeRO shards for stages 1-3)."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # the converter narrates on stdout/stderr ("Parsing checkpoint ...", a bar per file): keep
    # it in the debug log so the console shows our one export line
    said = io.StringIO()
    with _weights_only_torch_load(), redirect_stdout(said), redirect_stderr(said):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    log.debug("zero_to_fp32: %s", said.getvalue())
    return state


def export_model(state: dict, model_cfg: ModelConfig, tokenizer, out_dir: str | Path) -> Path:
    """Write a directory `from_pretrained` reads (the transformers part), plus the combiner
    weights, the tokenizer and `covr_config.json` (the model section of the config)."""
    from train.models import build_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(model_cfg, pretrained=None, lavis_checkpoint=None)
    model = build_model(cfg, tokenizer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("position_ids")]:
        raise RuntimeError(
            f"export: state does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.hf.save_pretrained(out)
    torch.save(model.combiner.state_dict(), out / "combiner.pt")
    if model.frozen_target is not None:  # the starting weights that encode targets
        torch.save(model.frozen_target.state_dict(), out / "target_encoder.pt")
    tokenizer.save_pretrained(out)
    saved = {
        **asdict(model_cfg),
        "pretrained": str(out.resolve()),
        "lavis_checkpoint": None,
        "tokenizer": None,
    }
    (out / "covr_config.json").write_text(json.dumps(saved, indent=1))
    return out


def load_exported(model_dir: str | Path, **overrides):
    """(model, tokenizer) from an exported directory; `overrides` change model settings
    (e.g. combiner, freeze_vision) for a next training stage."""
    from configs.schema import TextSize, VisionSize
    from data.tokenizer import load_tokenizer
    from train.models import build_model

    model_dir = Path(model_dir)
    path = model_dir / "covr_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not an exported CoVR model (no covr_config.json)")
    raw = json.loads(path.read_text())
    for dead in ("query_frames", "target_frames"):  # exports before these left the model section
        raw.pop(dead, None)
    raw["vision"], raw["text"] = VisionSize(**raw["vision"]), TextSize(**raw["text"])
    saved_combiner = raw["combiner"]
    raw.update(pretrained=str(model_dir), **overrides)
    cfg = ModelConfig(**raw)
    tok = load_tokenizer(model_dir)
    model = build_model(cfg, tok)
    combiner = model_dir / "combiner.pt"
    if combiner.is_file() and cfg.combiner == saved_combiner:
        model.combiner.load_state_dict(torch.load(combiner, weights_only=True))
    target = model_dir / "target_encoder.pt"  # absent: the exported weights are the starting ones
    if target.is_file() and model.frozen_target is not None:
        model.frozen_target.load_state_dict(torch.load(target, weights_only=True))
    return model, tok
