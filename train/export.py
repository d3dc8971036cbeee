"""Export: the trained model as a directory `from_pretrained` reads, and loading one back.

`consolidated_state_dict` gathers the fp32 weights (DeepSpeed's `zero_to_fp32` for ZeRO stages
1-3), `export_model` writes the transformers part with `save_pretrained` plus `combiner.pt`, the
frozen target encoder (`target_encoder.pt`), the tokenizer and `covr_config.json` (the model
section of the config); `load_exported` builds the model from such a directory."""

from __future__ import annotations

import io
import json
import logging
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, replace
from pathlib import Path

import torch

from configs.schema import ModelConfig, TextSize, VisionSize, marked
from data.tokenizer import load_tokenizer
from train.models import build_model, check_weights_file

log = logging.getLogger(__name__)


def consolidated_state_dict(engine, ckpt_dir: str | Path, tag: str, zero_stage: int) -> dict:
    """Full fp32 model state on CPU (from the ZeRO shards for stages 1-3: the checkpoint `tag`
    this run has just saved, so DeepSpeed's converter reads files of our own making)."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # the converter narrates on stdout/stderr ("Parsing checkpoint ...", a bar per file): keep
    # it in the debug log so the console shows our one export line
    said = io.StringIO()
    with redirect_stdout(said), redirect_stderr(said):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    log.debug("zero_to_fp32: %s", said.getvalue())
    return state


def export_model(state: dict, model_cfg: ModelConfig, tokenizer, out_dir: str | Path) -> Path:
    """Write a directory `from_pretrained` reads (the transformers part), plus the combiner
    weights, the tokenizer and `covr_config.json` (the model section of the config)."""

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
    # what a loader checks before it builds anything: every file, with its size
    saved["files"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    saved["files"].pop("covr_config.json", None)
    (out / "covr_config.json").write_text(json.dumps(saved, indent=1))
    return out


class ExportError(ValueError):
    """An exported model directory that is incomplete or damaged; names the file."""


def check_export(model_dir: Path) -> dict:
    """The export's `covr_config.json`, after checking that every file it lists is there with
    its size (exports before the list: the files every export writes), that the safetensors
    header reads and the `.pt` parts load. Raises `ExportError` naming the file."""
    path = model_dir / "covr_config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} is not an exported CoVR model (no covr_config.json)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    files = raw.pop("files", None) or dict.fromkeys(
        ["config.json", "model.safetensors", "combiner.pt", "tokenizer_config.json"]
        + ([] if raw.get("train_target_encoder", False) else ["target_encoder.pt"])
    )
    for name, size in files.items():
        part = model_dir / name
        if not part.is_file():
            raise ExportError(f"{part}: missing (the export is incomplete)")
        if size is not None and part.stat().st_size != size:
            raise ExportError(
                f"{part}: {part.stat().st_size} bytes, the export wrote {size} (cut short or "
                "damaged)"
            )
    check_weights_file(model_dir / "model.safetensors")
    for name in ("combiner.pt", "target_encoder.pt"):
        if name in files:
            _load_part(model_dir / name)
    return raw


def _load_part(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # pickle / zip errors of a damaged file
        raise ExportError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def load_exported(model_dir: str | Path, **overrides):
    """(model, tokenizer) from an exported directory; `overrides` change the model settings
    marked EXPORT_OVERRIDE (combiner, freeze_vision, ...) for a next training stage; the others
    are the exported weights' own."""
    allowed = marked(ModelConfig, "export_override")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"model.{unknown[0]} cannot change when starting from an export ({model_dir}); "
            f"these can: {', '.join(allowed)}"
        )
    model_dir = Path(model_dir)
    raw = check_export(model_dir)
    for dead in ("query_frames", "target_frames"):  # exports before these left the model section
        raw.pop(dead, None)
    raw["vision"], raw["text"] = VisionSize(**raw["vision"]), TextSize(**raw["text"])
    saved_combiner = raw["combiner"]
    raw.update(pretrained=str(model_dir), **overrides)
    try:
        cfg = ModelConfig(**raw)
    except TypeError as err:  # a key this version does not know
        raise ExportError(f"{model_dir / 'covr_config.json'}: {err}") from None
    tok = load_tokenizer(model_dir)
    model = build_model(cfg, tok)
    if cfg.combiner == saved_combiner:  # another combiner (an override) starts fresh
        _load_into(model.combiner, model_dir / "combiner.pt")
    # absent (an export trained with its target encoder): the exported weights are the start
    if model.frozen_target is not None and (model_dir / "target_encoder.pt").is_file():
        _load_into(model.frozen_target, model_dir / "target_encoder.pt")
    return model, tok


def _load_into(module: torch.nn.Module, path: Path) -> None:
    try:
        module.load_state_dict(_load_part(path))
    except RuntimeError as err:  # keys or shapes of another model
        raise ExportError(f"{path}: does not fit the model ({str(err).splitlines()[0]})") from None
