"""LAVIS / CoVR checkpoints onto the transformers BLIP-2 and BLIP retrieval classes, by
parameter name (docs/METHOD.md §6). Rules are (LAVIS template, transformers template)
pairs, so one table maps both ways; `{i}` is a layer index, `{p}` weight/bias, `{rest}` any tail.
"""

from __future__ import annotations

import logging
import pickle
import re
import types
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_VIT_BLOCKS = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("visual_encoder.blocks.{i}.norm1.{p}", "vision_model.encoder.layers.{i}.layer_norm1.{p}"),
    ("visual_encoder.blocks.{i}.norm2.{p}", "vision_model.encoder.layers.{i}.layer_norm2.{p}"),
    (
        "visual_encoder.blocks.{i}.attn.qkv.weight",
        "vision_model.encoder.layers.{i}.self_attn.qkv.weight",
    ),
    (
        "visual_encoder.blocks.{i}.attn.proj.{p}",
        "vision_model.encoder.layers.{i}.self_attn.projection.{p}",
    ),
    ("visual_encoder.blocks.{i}.mlp.fc1.{p}", "vision_model.encoder.layers.{i}.mlp.fc1.{p}"),
    ("visual_encoder.blocks.{i}.mlp.fc2.{p}", "vision_model.encoder.layers.{i}.mlp.fc2.{p}"),
]

RULES = {
    "blip2": _VIT_BLOCKS
    + [
        ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
        ("query_tokens", "query_tokens"),
        ("Qformer.bert.embeddings.word_embeddings.{p}", "embeddings.word_embeddings.{p}"),
        ("Qformer.bert.embeddings.position_embeddings.{p}", "embeddings.position_embeddings.{p}"),
        ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
        (
            "Qformer.bert.encoder.layer.{i}.attention.self.{rest}",
            "qformer.encoder.layer.{i}.attention.attention.{rest}",
        ),
        (
            "Qformer.bert.encoder.layer.{i}.crossattention.self.{rest}",
            "qformer.encoder.layer.{i}.crossattention.attention.{rest}",
        ),
        ("Qformer.bert.encoder.layer.{i}.{rest}", "qformer.encoder.layer.{i}.{rest}"),
        ("vision_proj.{p}", "vision_projection.{p}"),
        ("text_proj.{p}", "text_projection.{p}"),
        ("itm_head.{p}", "itm_head.{p}"),
    ],
    "blip": _VIT_BLOCKS
    + [
        (
            "visual_encoder.blocks.{i}.attn.qkv.bias",
            "vision_model.encoder.layers.{i}.self_attn.qkv.bias",
        ),
        ("visual_encoder.norm.{p}", "vision_model.post_layernorm.{p}"),
        ("text_encoder.{rest}", "text_encoder.{rest}"),
        ("vision_proj.{p}", "vision_proj.{p}"),
        ("text_proj.{p}", "text_proj.{p}"),
        ("itm_head.{p}", "itm_head.{p}"),
    ],
}
# LAVIS names with no transformers counterpart for retrieval (LM head, momentum encoders, queues).
IGNORED = re.compile(
    r"(^Qformer\.cls\.|^temp$|position_ids$|_m\.|_m$|_queue$|^idx_queue|^ptr_queue)"
)
# transformers parameters the CoVR forward never reads: the reference CoVR / CoVR-2 models have
# no ITM head, so their checkpoints lack it. Everything else must map, exactly.
UNUSED = {"blip2": re.compile(r"^itm_head\."), "blip": re.compile(r"^itm_head\.")}
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$")
_PIECES = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


class CheckpointMappingError(ValueError):
    """Names that do not map, or map onto a tensor of another shape."""


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if k % 2 == 0 else _PIECES[part] for k, part in enumerate(parts)
    )
    return re.compile(f"^{regex}$")


def _map_name(name: str, arch: str, to_hf: bool) -> str | None:
    for lavis_t, hf_t in RULES[arch]:
        source, target = (lavis_t, hf_t) if to_hf else (hf_t, lavis_t)
        m = _compile(source).match(name)
        if m:
            return target.format(**m.groupdict())
    return None


def lavis_to_hf(
    state: dict[str, torch.Tensor], arch: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Mapped state dict and the LAVIS names that did not map (ignored names excluded)."""
    out, unmapped, qv = {}, [], {}
    for name, tensor in state.items():
        if IGNORED.search(name):
            continue
        m = _QV_BIAS.match(name)
        if m and arch == "blip2":
            qv.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
            continue
        target = _map_name(name, arch, to_hf=True)
        if target is None:
            unmapped.append(name)
        else:
            out[target] = tensor
    for layer, biases in qv.items():  # transformers fuses [q_bias, 0, v_bias]
        q, v = biases["q"], biases["v"]
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat(
            [q, torch.zeros_like(q), v]
        )
    return out, unmapped


def hf_to_lavis(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The inverse mapping (tests, and writing checkpoints the LAVIS code can read)."""
    out = {}
    qkv_bias = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")
    for name, tensor in state.items():
        m = qkv_bias.match(name)
        if m and arch == "blip2":
            q, _, v = tensor.chunk(3)
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v
            continue
        target = _map_name(name, arch, to_hf=False)
        if target is None:
            raise CheckpointMappingError(f"no LAVIS name for {name}")
        out[target] = tensor
    return out


class _Inert:
    """Stands in for an object of a class not on the allowlist (a config, hyper-parameters, an
    optimizer schedule...): built and filled without running any of that class's code."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):  # used as a function (REDUCE): another inert object
        return type(self)()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self):
        return f"<not loaded: {self.name}>"


def _restricted_pickle(replaced: set[str]) -> types.ModuleType:
    """A `pickle_module` for `torch.load` whose unpickler resolves only the globals torch's own
    weights-only loader allows (tensors, storages, dtypes, OrderedDict...); any other global
    (os.system, a LAVIS config class, argparse.Namespace...) becomes an `_Inert` placeholder,
    so nothing from the file is ever imported or called."""
    from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

    allowed = {**_get_allowed_globals(), **_get_user_allowed_globals()}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            replaced.add(key)
            return type(f"Inert[{key}]", (_Inert,), {"name": key})

    module = types.ModuleType("covr_restricted_pickle")
    module.Unpickler = Unpickler
    module.load = lambda f, **kwargs: Unpickler(f, **kwargs).load()  # legacy format's header
    return module


def safe_load(path: str | Path):
    """`torch.load` that never executes code from the file: torch's weights-only loader first;
    when the file holds objects beyond its allowlist (real LAVIS / Lightning / CoVR checkpoints
    pickle configs, hyper-parameters, the schedule object), the restricted unpickler above
    keeps tensors and plain containers and turns every other object into an inert placeholder."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global outside torch's allowlist: read again with placeholders
    except Exception as err:
        raise CheckpointMappingError(f"{path}: not a readable torch checkpoint ({err})") from None
    replaced: set[str] = set()
    try:
        obj = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle(replaced)
        )
    except Exception as err:
        raise CheckpointMappingError(f"{path}: could not be read safely ({err})") from None
    log.info("%s: objects of classes not loaded (kept as placeholders): %s", path, sorted(replaced))
    return obj


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """Only the tensors, with DDP's `module.` prefix removed (as the reference's loader does)."""
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a LAVIS `.pth` or CoVR (Lightning Fabric) `.ckpt` ({"model": ...}),
    or a Lightning `.ckpt` ({"state_dict": {"model.<name>": ...}}); tensors only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = safe_load(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return _tensors(ckpt["model"])
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        return _tensors({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    if isinstance(ckpt, dict) and any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _tensors(ckpt)
    raise CheckpointMappingError(f"{path}: no state dict found (no 'model' or 'state_dict' key)")


def load_lavis_checkpoint(hf_model: nn.Module, path: str | Path, arch: str) -> None:
    """Load a LAVIS / CoVR checkpoint into a transformers model. Parameters the CoVR forward
    never uses (`UNUSED`) may be absent: they keep their initial values (logged). Any unmapped
    name, any other missing parameter or a shape mismatch is one `CheckpointMappingError`
    listing them all."""
    mapped, unmapped = lavis_to_hf(read_checkpoint(path), arch)
    own = hf_model.state_dict()
    absent = sorted(set(own) - set(mapped))
    left = [k for k in absent if UNUSED[arch].search(k)]
    missing = [k for k in absent if not UNUSED[arch].search(k)]
    unexpected = sorted(set(mapped) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and own[k].shape != v.shape
    ]
    problems = []
    for label, names in (
        ("unmapped", unmapped),
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape", shapes),
    ):
        if names:
            problems.append(f"{label} ({len(names)}): " + ", ".join(names[:20]))
    if problems:
        raise CheckpointMappingError(f"{path}: " + "; ".join(problems))
    hf_model.load_state_dict(mapped, strict=False)  # complete except `left` (checked above)
    if left:
        log.info(
            "%s: not in the checkpoint, unused by CoVR, left at their initial values: %s",
            path,
            ", ".join(left),
        )
