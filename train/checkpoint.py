"""Checkpoints: DeepSpeed's own directory per tag (model, optimizer, schedule, and the shared
part of the `TrainState`), the per-rank part of the state (RNG) beside it, and a COMPLETE marker
written by rank 0 after every rank has saved (a checkpoint without it is ignored on resume);
the export of a consolidated fp32 model in the transformers format.

Every file is read with `torch.load(weights_only=True)`, DeepSpeed's included: a crafted file
is refused, never executed."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from configs.schema import ModelConfig
from train.state import TrainState

COMPLETE = "COMPLETE"


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


def _rank_file(ckpt_dir: str | Path, tag: str) -> Path:
    return Path(ckpt_dir) / tag / f"rng_rank{_rank()}.pt"


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{COMPLETE}"))


def save_checkpoint(engine, ckpt_dir: str | Path, state: TrainState, keep: int = 2) -> str:
    """Every rank calls this. Returns the tag."""
    tag = f"step{state.step:08d}"
    shared = state.state_dict()
    own = {k: shared.pop(k) for k in TrainState.PER_RANK}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": shared})
    torch.save(own, _rank_file(ckpt_dir, tag))
    if dist.is_initialized():
        dist.barrier()
    if _rank() == 0:
        (Path(ckpt_dir) / tag / COMPLETE).write_text(json.dumps({"step": state.step}))
        for old in complete_tags(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, state: TrainState) -> None:
    """Restore the engine (model, optimizer, schedule) and `state` (with this rank's RNG)."""
    engine.checkpoint_engine.load = load_file  # DeepSpeed's own loader unpickles anything
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client_state is None or "train_state" not in client_state:
        raise CheckpointError(f"{Path(ckpt_dir) / tag}: no training state in this checkpoint")
    own_file = _rank_file(ckpt_dir, tag)
    if not own_file.is_file():
        raise CheckpointError(f"{own_file}: missing (this rank's part of the training state)")
    state.load_state_dict({**client_state["train_state"], **load_file(own_file)})


def consolidated_state_dict(engine, ckpt_dir: str | Path, tag: str, zero_stage: int) -> dict:
    """Full fp32 model state on CPU (from the ZeRO shards for stages 1-3)."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


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
