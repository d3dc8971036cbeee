"""CoVR models on the transformers BLIP-2 and BLIP retrieval classes.

Both expose the same interface (docs/METHOD.md §2), each method also reached through the one
`forward` as `model(Task.X, ...)`:
  encode_query(frames (B, Fq, 3, H, W), input_ids, attention_mask[, description ids, mask])
    -> (B, Q, D); `compose` (same arguments) also gives the mlp combiner's weights
  encode_target_frames(pixels (N, 3, H, W)) -> (N, Q, D), per-token normalised
  encode_target(frames (B, Ft, 3, H, W) or embeddings (B, Ft, Q, D), scores, mask) -> (B, Q, D)
  encode_text(input_ids, attention_mask) -> (B, D);  encode_image(frames) -> (B, D)
  encode_caption(input_ids, attention_mask) -> (B, D): the target caption, a target
Targets go through a frozen copy of the starting weights unless `train_target_encoder`.
BLIP is the case Q = 1. Query and target tokens are compared by `eval.similarity` (mean or max).
"""

from __future__ import annotations

import copy
import json
import logging
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    BlipConfig,
    BlipForImageTextRetrieval,
)

from configs.schema import ConfigError, ModelConfig
from eval.embed import eval_mode
from sharding.batch import Composed, Task
from sharding.embed import weights_fingerprint
from train.combiners import build_combiner

log = logging.getLogger(__name__)
ARCHS = ("blip2", "blip")
BLIP_VIT_LN_EPS = 1e-6  # the reference BLIP ViT (src/model/blip/vit.py); transformers builds 1e-5


def pool_frames(
    frame_embeddings: torch.Tensor,
    scores: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> torch.Tensor:
    """(B, F, Q, D) -> (B, Q, D) with w = softmax(scores / temperature) over the valid frames
    (`mask`); rows whose scores are missing (None or NaN) get uniform weights."""
    b, f = frame_embeddings.shape[:2]
    if mask is None:
        mask = torch.ones(b, f, dtype=torch.bool, device=frame_embeddings.device)
    if scores is None:
        scores = torch.full((b, f), float("nan"), device=frame_embeddings.device)
    missing = torch.isnan(scores).any(1, keepdim=True)
    logits = torch.where(missing, torch.zeros_like(scores), scores / temperature)
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
    return torch.einsum("bf,bfqd->bqd", weights.to(frame_embeddings.dtype), frame_embeddings)


class CoVRModel(nn.Module):
    """Shared parts: the combiner, frame pooling, freezing and the forward dispatcher."""

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.combiner = build_combiner(cfg.combiner, embed_dim)
        self.frozen_target = None
        self._fingerprint = None

    def _copy_starting_target_path(self) -> None:
        """train_target_encoder=false: targets (frames, captions) are encoded by a frozen copy of
        the starting weights under no_grad, as the reference precomputes them once with the
        frozen starting model: no gradient reaches any parameter from the target side, and
        training the query side does not move the targets. Only the parts that training changes
        are copied; frozen ones (the vision tower unless trained) are shared."""
        if self.cfg.train_target_encoder:
            return
        children = list(self.hf.named_children()) + list(self.hf.named_parameters(recurse=False))
        copies = nn.Module()
        for name, part in children:
            params = part.parameters() if isinstance(part, nn.Module) else [part]
            if any(p.requires_grad for p in params):
                setattr(copies, name, copy.deepcopy(part))
        if list(copies.parameters()):
            self.frozen_target = copies.requires_grad_(False).eval()

    def _part(self, name: str, frozen: bool):
        """`self.hf.<name>`, or its frozen starting copy on the target path."""
        if frozen and self.frozen_target is not None and hasattr(self.frozen_target, name):
            return getattr(self.frozen_target, name)
        return getattr(self.hf, name)

    def target_fingerprint(self) -> str:
        """Names what targets are encoded with (the frozen starting copy and the frozen parts it
        shares, and the settings that change the values): precomputed target embeddings are
        usable exactly when they carry the same fingerprint. Computed at the first call and kept
        (frozen weights do not change; under ZeRO-3 they are partitioned after the engine starts,
        so training asks before)."""
        if self._fingerprint is not None:
            return self._fingerprint
        tensors = {n: p for n, p in self.hf.named_parameters() if not p.requires_grad}
        if self.frozen_target is not None:
            tensors.update(
                {f"frozen_target.{n}": t for n, t in self.frozen_target.state_dict().items()}
            )
        c = self.cfg
        settings = {
            "arch": c.arch,
            "image_size": self.hf.config.vision_config.image_size,
            "ln_vision_eps": c.ln_vision_eps,
            "caption_words": c.caption_words,
            "caption_tokens": c.caption_tokens,
        }
        self._fingerprint = weights_fingerprint(tensors, settings)
        return self._fingerprint

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_target is not None:  # the starting model encodes targets in eval mode
            self.frozen_target.eval()
        return self

    def forward(self, task: Task, *args, **kwargs):
        """`model(Task.ENCODE_QUERY, ...)`: one entry point, so wrappers (DeepSpeed engine,
        torch.func.functional_call) reach every encoder."""
        if not isinstance(task, Task):
            raise TypeError(f"model task must be a sharding.batch.Task, got {task!r}")
        return getattr(self, task.value)(*args, **kwargs)

    def _vision(self, pixels: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        vision = self._part("vision_model", frozen)
        pixels = pixels.to(vision.embeddings.patch_embedding.weight.dtype)  # bf16 / fp16 engines
        if frozen:  # targets: the starting model in eval mode (a shared ViT: no stochastic depth)
            with torch.no_grad(), eval_mode(vision):
                return vision(pixel_values=pixels).last_hidden_state
        if self.cfg.freeze_vision:
            with torch.no_grad():
                return vision(pixel_values=pixels).last_hidden_state
        return vision(pixel_values=pixels).last_hidden_state

    def _query_vision(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, Fq, 3, H, W) -> vision tokens of all query frames, concatenated: (B, Fq*N, C)."""
        b, fq = frames.shape[:2]
        tokens = self._vision(frames.flatten(0, 1))
        return tokens.view(b, fq * tokens.shape[1], tokens.shape[2])

    def encode_target_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, Q, D): the vision tower, then the model's `target_head`; through
        the frozen starting copy unless the target encoder is trained."""
        if self.cfg.train_target_encoder:
            return self.target_head(self._vision(pixels))
        with torch.no_grad():
            return self.target_head(self._vision(pixels, frozen=True), frozen=True)

    def encode_caption(self, input_ids, attention_mask) -> torch.Tensor:
        """The target's caption (CoVR-2 caption term): a target, so frozen like the frames."""
        if self.cfg.train_target_encoder:
            return self.encode_text(input_ids, attention_mask)
        with torch.no_grad():
            return self.encode_text(input_ids, attention_mask, frozen=True)

    def encode_target(self, frames_or_embeddings, scores=None, mask=None) -> torch.Tensor:
        x = frames_or_embeddings
        if x.dim() == 5:  # frames
            b, f = x.shape[:2]
            x = self.encode_target_frames(x.flatten(0, 1))
            x = x.view(b, f, *x.shape[1:])
        return pool_frames(x.to(torch.float32), scores, mask, self.cfg.frame_score_temperature)

    def encode_image(self, frames: torch.Tensor) -> torch.Tensor:
        """Image-only embedding of the query's middle frame, (B, D)."""
        middle = frames[:, frames.shape[1] // 2]  # the live model: a query-side branch
        return F.normalize(self.target_head(self._vision(middle)).mean(1), dim=-1)

    def encode_fusion(self, frames, input_ids, attention_mask) -> torch.Tensor:
        """Joint encoding of the query frames and a text: (B, Q, D), normalised per token."""
        return self.fuse(self._query_vision(frames), input_ids, attention_mask)

    def compose(
        self, frames, input_ids, attention_mask, description_ids=None, description_mask=None
    ) -> Composed:
        """The combiner over the fused and unimodal encodings of the query. With a description
        (`model.description="separate"`), each text encoding is of the edit and of the
        description, mixed by `_with_description`; the query frames are encoded once."""
        described = description_ids is not None
        fused = None
        if self.combiner.needs_fusion:
            vision = self._query_vision(frames)
            fused = self.fuse(vision, input_ids, attention_mask)
            if described:
                fused = self._with_description(
                    fused, partial(self.fuse, vision), description_ids, description_mask
                )
        if not self.combiner.needs_unimodal:
            return Composed(*self.combiner(fused))
        image = self.encode_image(frames)
        text = self.encode_text(input_ids, attention_mask)
        if described:
            text = self._with_description(text, self.encode_text, description_ids, description_mask)
        return Composed(*self.combiner(fused, image, text))

    def _with_description(self, of_edit, encode, description_ids, description_mask):
        """normalize((1 - w) edit + w description), w = `description_weight` for the rows that
        have a description (a mask row not all zero), 0 for the others."""
        present = description_mask.any(1)
        mask = description_mask.clone()
        mask[:, 0] = 1  # an absent description reads its first token alone, at weight 0
        w = self.cfg.description_weight * present.to(of_edit.dtype)
        w = w.view(-1, *[1] * (of_edit.dim() - 1))
        return F.normalize((1 - w) * of_edit + w * encode(description_ids, mask), dim=-1)

    def encode_query(self, frames, input_ids, attention_mask, *description) -> torch.Tensor:
        return self.compose(frames, input_ids, attention_mask, *description).query

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class Blip2CoVR(CoVRModel):
    """BLIP-2 CoVR (CoVR-2): Q-Former joint encoding of frame(s) + edit through the query tokens."""

    def __init__(self, hf: Blip2ForImageTextRetrieval, cfg: ModelConfig):
        super().__init__(cfg, hf.config.image_text_hidden_size)
        self.hf = hf
        hf.vision_model.post_layernorm.eps = cfg.ln_vision_eps
        frozen = [hf.itm_head, hf.vision_projection]  # unused head; target projection frozen
        if cfg.freeze_vision:
            frozen.append(hf.vision_model)
        for module in frozen:
            module.requires_grad_(False)
        if cfg.train_target_encoder:
            hf.vision_projection.requires_grad_(True)
        self._copy_starting_target_path()

    @property
    def num_query_tokens(self) -> int:
        return self.hf.query_tokens.shape[1]

    def target_token_shape(self) -> tuple[int, int]:
        return self.num_query_tokens, self.hf.vision_projection.out_features

    def _qformer_queries(self, vision_tokens: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        queries = self._part("query_tokens", frozen).expand(vision_tokens.shape[0], -1, -1)
        return self._part("qformer", frozen)(
            query_embeds=queries,
            encoder_hidden_states=vision_tokens,
            encoder_attention_mask=torch.ones(
                vision_tokens.shape[:2], dtype=torch.long, device=vision_tokens.device
            ),
        ).last_hidden_state

    def target_head(self, vision_tokens: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        hidden = self._qformer_queries(vision_tokens, frozen)
        return F.normalize(self._part("vision_projection", frozen)(hidden), dim=-1)

    def fuse(self, vision_tokens, input_ids, attention_mask) -> torch.Tensor:
        b, q = vision_tokens.shape[0], self.num_query_tokens
        queries = self.hf.query_tokens.expand(b, -1, -1)
        embeds = self.hf.embeddings(input_ids=input_ids, query_embeds=queries)
        joint_mask = torch.cat(
            [
                torch.ones(b, q, dtype=attention_mask.dtype, device=attention_mask.device),
                attention_mask,
            ],
            1,
        )
        hidden = self.hf.qformer(
            query_embeds=embeds,
            query_length=q,
            attention_mask=joint_mask,
            encoder_hidden_states=vision_tokens,
            encoder_attention_mask=torch.ones(
                vision_tokens.shape[:2], dtype=torch.long, device=vision_tokens.device
            ),
        ).last_hidden_state
        return F.normalize(self.hf.text_projection(hidden[:, :q]), dim=-1)

    def encode_text(self, input_ids, attention_mask, frozen: bool = False) -> torch.Tensor:
        embeds = self._part("embeddings", frozen)(input_ids=input_ids)
        hidden = self._part("qformer", frozen)(
            query_embeds=embeds, query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        return F.normalize(self._part("text_projection", frozen)(hidden[:, 0]), dim=-1)


class BlipCoVR(CoVRModel):
    """BLIP CoVR: the image-grounded text encoder reads [ENC] + edit against the frame tokens."""

    def __init__(self, hf: BlipForImageTextRetrieval, cfg: ModelConfig, enc_token_id: int):
        super().__init__(cfg, hf.config.image_text_hidden_size)
        self.hf = hf
        vocab = hf.text_encoder.embeddings.word_embeddings.num_embeddings
        if not 0 <= enc_token_id < vocab:
            raise ValueError(
                f"[ENC] token id {enc_token_id} is outside the text vocabulary ({vocab})"
            )
        self.enc_token_id = enc_token_id
        # the reference ViT uses LayerNorm eps 1e-6 in every block and its final norm
        for module in hf.vision_model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = BLIP_VIT_LN_EPS
        hf.config.vision_config.layer_norm_eps = BLIP_VIT_LN_EPS
        frozen = [hf.itm_head]
        if cfg.freeze_vision:
            frozen.append(hf.vision_model)
        if not cfg.train_target_encoder:
            frozen.append(hf.vision_proj)
        for module in frozen:
            module.requires_grad_(False)
        self._copy_starting_target_path()

    def target_head(self, vision_tokens: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        return F.normalize(self._part("vision_proj", frozen)(vision_tokens[:, 0]), dim=-1)[:, None]

    def target_token_shape(self) -> tuple[int, int]:
        return 1, self.hf.vision_proj.out_features

    def encode_target(self, frames_or_embeddings, scores=None, mask=None) -> torch.Tensor:
        """Pooled over frames, then L2-normalised again (the reference's BLIP training and test
        both normalise the pooled target feature)."""
        return F.normalize(super().encode_target(frames_or_embeddings, scores, mask), dim=-1)

    def fuse(self, vision_tokens, input_ids, attention_mask) -> torch.Tensor:
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        hidden = self.hf.text_encoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=vision_tokens,
            encoder_attention_mask=torch.ones(
                vision_tokens.shape[:2], dtype=torch.long, device=vision_tokens.device
            ),
        ).last_hidden_state
        return F.normalize(self.hf.text_proj(hidden[:, 0]), dim=-1)[:, None]

    def encode_text(self, input_ids, attention_mask, frozen: bool = False) -> torch.Tensor:
        hidden = self._part("text_encoder", frozen)(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        return F.normalize(self._part("text_proj", frozen)(hidden[:, 0]), dim=-1)


def add_stochastic_depth(vision_model: nn.Module, rate: float) -> None:
    """Stochastic depth on the ViT's residual branches, as the reference's BLIP ViT (timm
    DropPath, the rate rising linearly from 0 at the first block to `rate` at the last). In train
    mode each sample's attention and MLP branch outputs are dropped with their block's rate and
    kept ones scaled by 1 / (1 - rate), each branch drawn on its own. The reference runs its
    frozen ViT in train mode, so this acts on the query frame although the ViT is frozen. Forward
    hooks: parameter names and checkpoints are unchanged."""
    layers = vision_model.encoder.layers
    for i, layer in enumerate(layers):
        p = rate * i / max(1, len(layers) - 1)
        if p > 0:
            layer.self_attn.register_forward_hook(partial(_drop_branch, p))
            layer.mlp.register_forward_hook(partial(_drop_branch, p))


def _drop_branch(p: float, module: nn.Module, args, output):
    if not module.training:
        return None  # output unchanged
    branch = output[0] if isinstance(output, tuple) else output
    shape = (branch.shape[0],) + (1,) * (branch.dim() - 1)
    keep = branch.new_empty(shape).bernoulli_(1 - p).div_(1 - p)
    return (branch * keep, *output[1:]) if isinstance(output, tuple) else branch * keep


def set_dropout(hf, arch: str, p: float) -> None:
    """Dropout of the Q-Former (BLIP-2) / text encoder (BLIP), hidden and attention, also on
    loaded weights: the modules read it at build time (`nn.Dropout.p`, BLIP-2's attention keeps
    a float), so both are set, and the config for `save_pretrained`."""
    text_cfg = hf.config.qformer_config if arch == "blip2" else hf.config.text_config
    text_cfg.hidden_dropout_prob = text_cfg.attention_probs_dropout_prob = p
    for module in (hf.qformer if arch == "blip2" else hf.text_encoder).modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


def hf_config(cfg: ModelConfig, vocab_size: int):
    """A transformers config of the sizes in `cfg` (used when no pretrained directory is given)."""
    v, t = cfg.vision, cfg.text
    vision = dict(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        intermediate_size=v.intermediate_size,
        image_size=v.image_size,
        patch_size=v.patch_size,
        initializer_range=0.02,  # the library default (1e-10) leaves a from-scratch ViT at ~0
    )
    if cfg.arch == "blip":
        vision["layer_norm_eps"] = BLIP_VIT_LN_EPS
    text = dict(
        hidden_size=t.hidden_size,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        intermediate_size=t.intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        encoder_hidden_size=v.hidden_size,
    )
    if cfg.arch == "blip2":
        text.update(
            cross_attention_frequency=t.cross_attention_frequency, use_qformer_text_input=True
        )
        return Blip2Config(
            vision_config=vision,
            qformer_config=text,
            num_query_tokens=cfg.num_query_tokens,
            image_text_hidden_size=cfg.embed_dim,
        )
    if cfg.arch == "blip":
        return BlipConfig(
            vision_config=vision,
            text_config=text,
            projection_dim=cfg.embed_dim,
            image_text_hidden_size=cfg.embed_dim,
        )
    raise ValueError(f"unknown model.arch {cfg.arch!r}; one of {ARCHS}")


def check_pretrained_sizes(cfg: ModelConfig, config) -> None:
    """`model.vision` / `model.text` / query tokens / embedding size must be what the weights in
    `model.pretrained` have: a disagreement is an error naming both values, never ignored."""
    v = config.vision_config
    text = config.qformer_config if cfg.arch == "blip2" else config.text_config
    pairs = {
        "model.vision.hidden_size": (cfg.vision.hidden_size, v.hidden_size),
        "model.vision.layers": (cfg.vision.layers, v.num_hidden_layers),
        "model.vision.heads": (cfg.vision.heads, v.num_attention_heads),
        "model.vision.intermediate_size": (cfg.vision.intermediate_size, v.intermediate_size),
        "model.vision.image_size": (cfg.vision.image_size, v.image_size),
        "model.vision.patch_size": (cfg.vision.patch_size, v.patch_size),
        "model.text.hidden_size": (cfg.text.hidden_size, text.hidden_size),
        "model.text.layers": (cfg.text.layers, text.num_hidden_layers),
        "model.text.heads": (cfg.text.heads, text.num_attention_heads),
        "model.text.intermediate_size": (cfg.text.intermediate_size, text.intermediate_size),
        "model.embed_dim": (cfg.embed_dim, config.image_text_hidden_size),
    }
    if cfg.arch == "blip2":
        pairs["model.text.cross_attention_frequency"] = (
            cfg.text.cross_attention_frequency,
            text.cross_attention_frequency,
        )
        pairs["model.num_query_tokens"] = (cfg.num_query_tokens, config.num_query_tokens)
    bad = [
        f"{key}={ours} but the weights have {theirs}"
        for key, (ours, theirs) in pairs.items()
        if ours != theirs
    ]
    if bad:
        raise ConfigError(f"model.pretrained={cfg.pretrained}: " + "; ".join(bad))


class UnreadableWeights(ValueError):
    """A weights file or model directory that cannot be read; names the file."""


def check_weights_file(path: Path) -> None:
    """A safetensors file whose header reads (a file cut short fails here, not deep inside
    `from_pretrained`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise UnreadableWeights(f"{path}: unreadable safetensors ({err})") from None


def check_pretrained_dir(path: str | Path) -> None:
    """`model.pretrained`: a transformers model directory with a readable config and weights."""
    d = Path(path)
    config = d / "config.json"
    if not config.is_file():
        raise UnreadableWeights(
            f"model.pretrained={d}: no config.json (not a model directory in the transformers "
            "format)"
        )
    try:
        json.loads(config.read_text())
    except ValueError as err:
        raise UnreadableWeights(f"{config}: not valid JSON ({err})") from None
    if (d / "model.safetensors").is_file():
        check_weights_file(d / "model.safetensors")
    elif not any((d / n).is_file() for n in PRETRAINED_WEIGHTS):
        raise UnreadableWeights(
            f"model.pretrained={d}: no weights (model.safetensors, {', '.join(PRETRAINED_WEIGHTS)})"
        )


PRETRAINED_WEIGHTS = (
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def build_model(cfg: ModelConfig, tokenizer) -> CoVRModel:
    """From `cfg.pretrained` (local transformers directory, sizes checked against `cfg`) or from
    the sizes in `cfg`; then a LAVIS / CoVR checkpoint on top when `cfg.lavis_checkpoint` is set.
    The frozen target path is copied from the starting weights: `pretrained` when given (a CoVR
    checkpoint holds the trained query side; the reference encodes targets with the starting
    model), else the checkpoint itself."""
    cls = {"blip2": Blip2ForImageTextRetrieval, "blip": BlipForImageTextRetrieval}.get(cfg.arch)
    if cls is None:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; one of {ARCHS}")
    if cfg.pretrained:
        check_pretrained_dir(cfg.pretrained)
        hf = cls.from_pretrained(cfg.pretrained, local_files_only=True)
        check_pretrained_sizes(cfg, hf.config)
    else:
        hf = cls(hf_config(cfg, len(tokenizer)))
        if (
            cfg.arch == "blip2"
        ):  # as LAVIS: zero query tokens + LayerNorm eps 1e-12 = exploding gradients
            nn.init.normal_(hf.query_tokens, std=hf.config.qformer_config.initializer_range)
        # from scratch: start the query and target projections equal (aligned spaces)
        projections = (
            ("text_projection", "vision_projection")
            if cfg.arch == "blip2"
            else ("text_proj", "vision_proj")
        )
        query_proj, target_proj = getattr(hf, projections[0]), getattr(hf, projections[1])
        if query_proj.weight.shape == target_proj.weight.shape:
            query_proj.load_state_dict(target_proj.state_dict())
    from train.lavis import load_lavis_checkpoint

    if cfg.lavis_checkpoint and not cfg.pretrained:
        load_lavis_checkpoint(hf, cfg.lavis_checkpoint, cfg.arch)
        if not cfg.train_target_encoder:
            log.warning(
                "targets are encoded by %s itself: set model.pretrained to the starting "
                "weights to encode them as the reference does",
                cfg.lavis_checkpoint,
            )
    set_dropout(hf, cfg.arch, cfg.dropout)
    if cfg.arch == "blip2":
        model = Blip2CoVR(hf, cfg)
    else:
        model = BlipCoVR(hf, cfg, enc_token_id=tokenizer.convert_tokens_to_ids("[ENC]"))
    if cfg.lavis_checkpoint and cfg.pretrained:
        load_lavis_checkpoint(model.hf, cfg.lavis_checkpoint, cfg.arch)
    if cfg.vision_drop_path:  # the live ViT only: the frozen target copy encodes in eval mode
        add_stochastic_depth(model.hf.vision_model, cfg.vision_drop_path)
    return model
