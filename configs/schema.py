"""The typed configuration tree. Sections are added as the packages that read them land."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class SynthConfig:
    """The synthetic video corpus (data.synthetic)."""

    videos: int = 1000
    family_size: int = 5  # videos sharing the uncaptioned attributes (position, size, speed)
    frames: int = 16
    fps: int = 8
    size: int = 64  # square frame side in pixels (even, for yuv420p)
    workers: int = 2
    seed: int = 1234


@dataclass
class MiningConfig:
    """Triplet mining from a caption table (data.mining)."""

    max_videos_per_caption: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 1234


@dataclass
class FilterConfig:
    """Metadata filter (data.filtering): keep a triplet iff author or categories match."""

    by_author: bool = True
    by_category: bool = True


@dataclass
class DataConfig:
    root: str = "runs/demo/corpus"  # corpus directory: videos/, captions.csv, {train,val,test}.csv
    synth: SynthConfig = field(default_factory=SynthConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class ShardConfig:
    """WebDataset shards (sharding.pack) and their streaming (sharding.reader)."""

    dir: str = "runs/demo/shards"
    prefix: str = "covr"
    samples_per_shard: int = 256
    # target: one record per target video, a triplet drawn per epoch; triplet: one per triplet
    epoch: Literal["target", "triplet"] = "target"
    query_frames: int = 1
    target_frames: int = 15
    frame_size: int = 0  # resize frames to this square size before JPEG encoding; 0 keeps them
    jpeg_quality: int = 90
    workers: int = 2  # packing processes (or Ray tasks in flight)
    seed: int = 1234
    loader_workers: int = 2  # DataLoader workers per rank
    allow_pipe: bool = False  # `pipe:` shard URLs run shell commands: refused unless enabled


@dataclass
class VisionSize:
    """Vision tower size (ViT). Ignored when weights come from `model.pretrained`."""

    hidden_size: int = 1408
    layers: int = 39
    heads: int = 16
    intermediate_size: int = 6144
    image_size: int = 364
    patch_size: int = 14


@dataclass
class TextSize:
    """Q-Former (BLIP-2) or text encoder (BLIP) size."""

    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    arch: Literal["blip2", "blip"] = "blip2"
    pretrained: str | None = None  # local directory in the transformers format
    lavis_checkpoint: str | None = None  # LAVIS .pth / CoVR .ckpt, mapped by parameter name
    tokenizer: str | None = None  # local tokenizer directory (default: `pretrained`)
    vision: VisionSize = field(default_factory=VisionSize)
    text: TextSize = field(default_factory=TextSize)
    num_query_tokens: int = 32
    embed_dim: int = 256
    max_text_len: int = 32
    ln_vision_eps: float = 1e-5  # LAVIS's ln_vision; transformers builds 1e-6
    freeze_vision: bool = True
    train_target_encoder: bool = False  # True: targets re-encoded each step, EMA feeds the queue
    combiner: Literal["fusion", "avg", "mlp", "text", "image"] = "fusion"
    reduce: Literal["mean", "max"] = "mean"  # over target tokens
    frame_score_temperature: float = 0.1
    dropout: float = 0.1  # Q-Former / text encoder, hidden and attention (the reference's); 0 = off


@dataclass
class LossConfig:
    temperature: float = 0.07
    alpha: float = 1.0
    beta: float = 0.5  # 0 = InfoNCE
    video_weight: float = 1.0
    caption_weight: float = 0.0  # CoVR-2 pretraining: 0.5 / 0.5


@dataclass
class QueueConfig:
    size: int = 0  # 0 = no queue (the reference); e.g. 65536
    momentum: float = 0.995  # EMA of the target encoder when it is trainable


@dataclass
class SamplerConfig:
    kind: Literal["random", "hns", "fs", "mix"] = "random"
    beta: float = 0.6  # mix: probability of an FS batch
    buffer: int = 1024  # samples held to compose batches from


@dataclass
class AugmentConfig:
    """Training-time augmentation of decoded frames (off in the reference recipes). Applied to a
    sample's query and target frames alike, so what relates them (position, size) still does."""

    hflip: float = 0.0  # probability of a horizontal flip
    shift: int = 0  # max translation in pixels (model input), edges replicated
    target_frames: int = 0  # train on a random subset of this many of a target's frames; 0 = all


@dataclass
class OptimConfig:
    """AdamW + cosine schedule (the reference recipes: weight decay 0.05, no warm-up)."""

    lr: float = 2e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: Literal["cosine", "cosine_epoch"] = "cosine"  # per optimizer step | per epoch
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0 = no clipping


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer state on CPU (DeepSpeed CPU Adam)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16: GPU only
    activation_checkpointing: bool = False  # of the Q-Former / text encoder layers
    timeout_s: int = 600  # collective timeout: a dead rank ends the job within this bound


@dataclass
class TrainConfig:
    out_dir: str = "runs/demo/train"
    epochs: int = 5
    max_steps: int = 0  # > 0: stop after this many optimizer steps
    batch_size: int = 256  # per rank, per micro step (replaced when global_batch_size > 0)
    global_batch_size: int = 0  # > 0: batch_size = global / (world size * grad_accum)
    # > 0: embed the batch in chunks of this many samples, loss over the whole global batch
    # (gradient cache): activation memory follows the chunk, not the batch; 0 = off
    chunk_size: int = 0
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0  # optimizer steps; 0 = after every epoch
    ckpt_every: int = 500  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    seed: int = 1234
    resume: Literal["auto", "none"] = "auto"  # auto: newest complete checkpoint in out_dir
    init_from: str = ""  # exported model directory to start from (e.g. a pretraining stage)
    stage: Literal["covr", "itc"] = "covr"  # itc: image-text contrastive pretraining on captions


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<train.out_dir>/mlflow.db
    experiment: str = "covr-train"
    run_name: str = ""
    parent_run_id: str = ""  # a sweep's run: this run becomes its child
    artifact_location: str = ""  # new experiment's artifacts; "" = <store dir>/mlartifacts (SQLite)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=list)  # recall@K of validation; [] = eval.protocols.KS
    batch_size: int = 64
    report_queries: int = 8  # val queries in the end-of-training report (0: none)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


POSITIVE = (
    "train.batch_size",
    "train.grad_accum",
    "shards.samples_per_shard",
    "shards.target_frames",
    "shards.query_frames",
    "loss.temperature",
)
FRACTIONS = ("data.mining.val_fraction", "data.mining.test_fraction", "sampler.beta")
# values that used to fail only after the ranks had started (or trained nothing and exited 0)
POSITIVE_RUN = (
    "optim.lr",
    "train.epochs",
    "train.log_every",
    "train.keep_checkpoints",
    "deepspeed.timeout_s",
    "eval.batch_size",
    "shards.workers",
    "data.synth.videos",
    "model.num_query_tokens",
    "model.embed_dim",
    "model.max_text_len",
)
NON_NEGATIVE = (
    "train.max_steps",
    "train.eval_every",
    "train.ckpt_every",
    "optim.weight_decay",
    "optim.grad_clip",
    "optim.warmup_steps",
    "shards.loader_workers",
    "shards.frame_size",
    "eval.report_queries",
    "loss.beta",
    "loss.alpha",
    "augment.shift",
    "augment.target_frames",
)
UNIT = (
    "optim.min_lr_ratio",
    "queue.momentum",
    "optim.beta1",
    "optim.beta2",
    "augment.hflip",
)  # in [0, 1]


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> Config:
    """Value checks the types cannot express (choices are `Literal` fields, checked by OmegaConf);
    each failure names its key."""
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"key '{key}': must be > 0, got {_get(cfg, key)!r}")
    for key in FRACTIONS:
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"key '{key}': must be in [0, 1], got {_get(cfg, key)!r}")
    if cfg.train.global_batch_size < 0:
        raise ConfigError(
            f"key 'train.global_batch_size': must be >= 0, got {cfg.train.global_batch_size}"
        )
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"key 'model.dropout': must be in [0, 1), got {cfg.model.dropout!r}")
    if cfg.train.chunk_size < 0:
        raise ConfigError(f"key 'train.chunk_size': must be >= 0, got {cfg.train.chunk_size}")
    if cfg.queue.size < 0:
        raise ConfigError(f"key 'queue.size': must be >= 0, got {cfg.queue.size}")
    for key in POSITIVE_RUN:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"key '{key}': must be > 0, got {_get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"key '{key}': must be >= 0, got {_get(cfg, key)!r}")
    for key in UNIT:
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"key '{key}': must be in [0, 1], got {_get(cfg, key)!r}")
    if not 1 <= cfg.shards.jpeg_quality <= 100:
        raise ConfigError(
            f"key 'shards.jpeg_quality': must be in [1, 100], got {cfg.shards.jpeg_quality}"
        )
    if cfg.data.synth.size <= 0 or cfg.data.synth.size % 2:  # yuv420p needs an even side
        raise ConfigError(f"key 'data.synth.size': must be even and > 0, got {cfg.data.synth.size}")
    if cfg.data.synth.family_size < 2:
        raise ConfigError(
            f"key 'data.synth.family_size': must be >= 2, got {cfg.data.synth.family_size}"
        )
    if cfg.eval.ks and min(cfg.eval.ks) < 1:  # [] = the protocol's own list
        raise ConfigError(f"key 'eval.ks': ranks must be >= 1, got {list(cfg.eval.ks)}")
    return cfg


def per_rank_batch_size(cfg: Config, world: int) -> int:
    """`train.global_batch_size` split over ranks and accumulation steps (else
    `train.batch_size`); HN-NCE depends on the global batch, so it must divide exactly."""
    total, accum = cfg.train.global_batch_size, cfg.train.grad_accum
    if not total:
        return cfg.train.batch_size
    if total % (world * accum):
        raise ConfigError(
            f"key 'train.global_batch_size': {total} is not divisible by world size {world} x "
            f"train.grad_accum {accum}"
        )
    return total // (world * accum)


def yaml_error(path: str | Path, err: yaml.YAMLError) -> str:
    """'FILE:LINE: YAML syntax error: what the parser expected' (lines counted from 1)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}: YAML syntax error: {what}"


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, validated against the schema."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_describe(err)}") from None
        except yaml.YAMLError as err:
            raise ConfigError(yaml_error(path, err)) from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override must be key=value: {bad[0]!r}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"override: {_describe(err)}") from None
    return validate(OmegaConf.to_object(merged))


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (for logging as params, for manifests)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
