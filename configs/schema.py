"""The typed configuration tree. Sections are added as the packages that read them land."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# What a field is for beyond its value, marked where it is declared (`field(metadata=...)`) and
# read back with `marked`: the shards' fingerprint, the resume check and export loading use them.
PACKING = {"packing": True}  # part of the shards' fingerprint: changing it means repacking
RESUME_FREE = {"resume_free": True}  # may change when a run resumes from its checkpoint
EXPORT_OVERRIDE = {"export_override": True}  # a run starting from an export may set it anew


def marked(section, flag: str, prefix: str = "") -> list[str]:
    """Dotted keys of the fields of `section` (a config class or instance, nested sections
    included) carrying `flag`, in declaration order."""
    keys = []
    for f in fields(section):
        if is_dataclass(f.default_factory):  # a nested section
            keys += marked(f.default_factory, flag, f"{prefix}{f.name}.")
        elif f.metadata.get(flag):
            keys.append(f"{prefix}{f.name}")
    return keys


class FieldError(ValueError):
    """One field of a section out of range (`validate` adds the section's path)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def _require(section, ok, rule: str, names) -> None:
    for name in names:
        value = getattr(section, name)
        if not ok(value):
            raise FieldError(name, f"must be {rule}, got {value!r}")


def positive(section, *names) -> None:
    _require(section, lambda v: v > 0, "> 0", names)


def non_negative(section, *names) -> None:
    _require(section, lambda v: v >= 0, ">= 0", names)


def in_range(section, low, high, *names) -> None:
    _require(section, lambda v: low <= v <= high, f"in [{low}, {high}]", names)


@dataclass
class SynthConfig:
    """The synthetic video corpus (data.synthetic)."""

    videos: int = 1000
    family_size: int = 5  # videos sharing the uncaptioned attributes (position, size, speed)
    frames: int = 16
    fps: int = 8
    size: int = 64  # square frame side in pixels (even, for yuv420p)
    workers: int = field(default=2, metadata=RESUME_FREE)
    seed: int = 1234

    def check(self) -> None:
        positive(self, "videos")
        if self.size <= 0 or self.size % 2:  # yuv420p needs an even side
            raise FieldError("size", f"must be even and > 0, got {self.size}")
        if self.family_size < 2:
            raise FieldError("family_size", f"must be >= 2, got {self.family_size}")


@dataclass
class MiningConfig:
    """Triplet mining from a caption table (data.mining)."""

    max_videos_per_caption: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 1234

    def check(self) -> None:
        in_range(self, 0, 1, "val_fraction", "test_fraction")


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
class MixSource:
    """One weighted training source of `shards.mix`: a packed (or embedded) train split."""

    dir: str = ""
    weight: float = 1.0


@dataclass
class ShardConfig:
    """WebDataset shards (sharding.pack) and their streaming (sharding.reader)."""

    dir: str = "runs/demo/shards"
    prefix: str = "covr"
    # target: one record per target video, a triplet drawn per epoch; triplet: one per triplet
    epoch: Literal["target", "triplet"] = field(default="target", metadata=PACKING)
    samples_per_shard: int = field(default=256, metadata=PACKING)
    query_frames: int = field(default=1, metadata=PACKING)
    target_frames: int = field(default=15, metadata=PACKING)
    # resize frames to this square size before JPEG encoding; 0 keeps them
    frame_size: int = field(default=0, metadata=PACKING)
    # how frames are stored: jpeg (quality below; the default, ~10x smaller) or png (lossless,
    # the reference feeds decoded frames; bench/codec_bench.py measures what JPEG costs)
    frame_format: Literal["jpeg", "png"] = field(default="jpeg", metadata=PACKING)
    jpeg_quality: int = field(default=90, metadata=PACKING)
    # bgr stores target frames channel-swapped: the reference's target-embedding script reads
    # videos with OpenCV and never converts, so its released embeddings and checkpoints saw BGR
    # targets (queries RGB). Only for reproducing those; ours is rgb.
    target_channels: Literal["rgb", "bgr"] = field(default="rgb", metadata=PACKING)
    # packing processes (or Ray tasks in flight)
    workers: int = field(default=2, metadata=RESUME_FREE)
    seed: int = field(default=1234, metadata=PACKING)
    loader_workers: int = field(default=2, metadata=RESUME_FREE)  # DataLoader workers per rank
    allow_pipe: bool = False  # `pipe:` shard URLs run shell commands: refused unless enabled
    # train on several shard sets with weights (sharding.mix; each dir a train split, e.g.
    # CC-CoIR beside WebVid-CoVR) instead of <dir>/train; validation stays <dir>/val
    mix: list[MixSource] = field(default_factory=list)
    # dir (or a mix dir) may be an http(s):// or object-store URL (sharding.remote): each ranged
    # read is tried `retries` times, waiting retry_wait_s, doubling, before the shard is skipped
    retries: int = field(default=5, metadata=RESUME_FREE)
    retry_wait_s: float = field(default=1.0, metadata=RESUME_FREE)
    # keep remote shards read once on local disk (per node; bounded, least recently read out)
    cache_dir: str = field(default="", metadata=RESUME_FREE)
    cache_gb: float = field(default=100.0, metadata=RESUME_FREE)

    def check(self) -> None:
        positive(self, "samples_per_shard", "target_frames", "query_frames", "workers")
        positive(self, "retries", "cache_gb")
        for i, source in enumerate(self.mix):
            if not source.dir:
                raise FieldError(f"mix[{i}].dir", "must name a train split's shard directory")
            if not source.weight > 0:
                raise FieldError(f"mix[{i}].weight", f"must be > 0, got {source.weight!r}")
        non_negative(self, "loader_workers", "frame_size", "retry_wait_s")
        in_range(self, 1, 100, "jpeg_quality")


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
    # edits: words kept by the cleaning (pre_caption) and tokens in training; the reference's
    # 30 and 32 (CoVR-2: 35). Long-edit data (Dense-WebVid-CoVR, about 31 words) needs more
    edit_words: int = 30
    max_text_len: int = 32
    # a triplet's query-video description (CSV column `description` or `caption`): ignore |
    # concat (after the edit, in one text within edit_words / max_text_len) | separate (its own
    # text of up to description_tokens tokens through the same encoder as the edit, with the
    # query video; the two mixed (1 - w) edit + w description, then re-normalised; ECDE's w: 0.2)
    description: Literal["ignore", "concat", "separate"] = "ignore"
    description_tokens: int = 128
    description_weight: float = 0.2
    # the target caption (CoVR-2's caption term): words kept by the cleaning and tokens kept
    # (0: the whole caption, up to the text position embeddings). CoVR-2's embedding script
    # cleans to 50 words and does not truncate
    caption_words: int = 30
    caption_tokens: int = 32
    ln_vision_eps: float = 1e-5  # LAVIS's ln_vision; transformers builds 1e-6
    freeze_vision: bool = field(default=True, metadata=EXPORT_OVERRIDE)
    # True: targets re-encoded each step, EMA feeds the queue
    train_target_encoder: bool = field(default=False, metadata=EXPORT_OVERRIDE)
    # train and evaluate against the reference's released target embeddings (shards made by
    # `launch/shard.py import-released`); refused with shards embedded by this project
    released_targets: bool = False
    combiner: Literal["fusion", "avg", "mlp", "text", "image"] = field(
        default="fusion", metadata=EXPORT_OVERRIDE
    )
    # over target tokens
    reduce: Literal["mean", "max"] = field(default="mean", metadata=EXPORT_OVERRIDE)
    frame_score_temperature: float = 0.1
    # Q-Former / text encoder, hidden and attention (the reference's); 0 = off
    dropout: float = field(default=0.1, metadata=EXPORT_OVERRIDE)
    # ViT stochastic depth at the last block (linear from 0), active in train mode even when the
    # ViT is frozen, as the reference's BLIP (0.1); 0 = off (transformers' ViTs have none)
    vision_drop_path: float = field(default=0.0, metadata=EXPORT_OVERRIDE)

    def check(self) -> None:
        positive(
            self,
            "num_query_tokens",
            "embed_dim",
            "edit_words",
            "max_text_len",
            "caption_words",
            "description_tokens",
        )
        non_negative(self, "caption_tokens")
        longest = self.text.max_position_embeddings
        checked = ("max_text_len", "caption_tokens")
        if self.description == "separate":  # else not tokenised
            checked += ("description_tokens",)
        for key in checked:
            if getattr(self, key) > longest:
                raise FieldError(
                    key,
                    f"{getattr(self, key)} tokens do not fit the text encoder's {longest} "
                    "position embeddings (model.text.max_position_embeddings)",
                )
        for key in ("dropout", "vision_drop_path"):
            if not 0 <= getattr(self, key) < 1:
                raise FieldError(key, f"must be in [0, 1), got {getattr(self, key)!r}")
        in_range(self, 0, 1, "description_weight")

    def caption_tokenization(self) -> dict:
        """`data.text.tokenize` arguments for target captions."""
        if self.caption_tokens:
            return {"max_words": self.caption_words, "max_length": self.caption_tokens}
        longest = self.text.max_position_embeddings
        return {"max_words": self.caption_words, "max_length": longest, "padding": "longest"}


@dataclass
class LossConfig:
    temperature: float = 0.07
    alpha: float = 1.0
    beta: float = 0.5  # 0 = InfoNCE
    video_weight: float = 1.0
    caption_weight: float = 0.0  # CoVR-2 pretraining: 0.5 / 0.5
    # corrected: the published formula, detached weights; reference: the reference code's
    # value and gradient (train/losses.py), to compare with its runs
    hn_nce: Literal["corrected", "reference"] = "corrected"
    # one: a query's own target is its positive, every other target a negative (the reference);
    # all: every valid target of the query (the shards' `targets`: triplets sharing its query
    # video and edit, as TF-CoVR's several targets) is a positive, never a negative
    positives: Literal["one", "all"] = "one"

    def check(self) -> None:
        positive(self, "temperature")
        non_negative(self, "beta", "alpha")
        if self.positives == "all" and self.hn_nce == "reference":
            raise FieldError("positives", "'all' needs hn_nce=corrected (the reference has one)")


@dataclass
class QueueConfig:
    size: int = 0  # 0 = no queue (the reference); e.g. 65536
    momentum: float = 0.995  # EMA of the target encoder when it is trainable

    def check(self) -> None:
        non_negative(self, "size")
        in_range(self, 0, 1, "momentum")


@dataclass
class SamplerConfig:
    kind: Literal["random", "hns", "fs", "mix"] = "random"
    beta: float = 0.6  # mix: probability of an FS batch
    buffer: int = 1024  # samples held to compose batches from

    def check(self) -> None:
        in_range(self, 0, 1, "beta")


@dataclass
class AugmentConfig:
    """Training-time augmentation of decoded frames (off in the reference recipes). Applied to a
    sample's query and target frames alike, so what relates them (position, size) still does."""

    hflip: float = 0.0  # probability of a horizontal flip
    shift: int = 0  # max translation in pixels (model input), edges replicated
    target_frames: int = 0  # train on a random subset of this many of a target's frames; 0 = all

    def check(self) -> None:
        non_negative(self, "shift", "target_frames")
        in_range(self, 0, 1, "hflip")


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

    def check(self) -> None:
        positive(self, "lr")
        non_negative(self, "weight_decay", "grad_clip", "warmup_steps")
        in_range(self, 0, 1, "min_lr_ratio", "beta1", "beta2")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer state on CPU (DeepSpeed CPU Adam)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16: GPU only
    activation_checkpointing: bool = False  # of the Q-Former / text encoder layers
    # collective timeout: a dead rank ends the job within this bound
    timeout_s: int = field(default=600, metadata=RESUME_FREE)

    def check(self) -> None:
        positive(self, "timeout_s")


@dataclass
class TrainConfig:
    out_dir: str = field(default="runs/demo/train", metadata=RESUME_FREE)
    epochs: int = field(default=5, metadata=RESUME_FREE)
    # > 0: stop after this many optimizer steps
    max_steps: int = field(default=0, metadata=RESUME_FREE)
    batch_size: int = 256  # per rank, per micro step (replaced when global_batch_size > 0)
    global_batch_size: int = 0  # > 0: batch_size = global / (world size * grad_accum)
    # > 0: embed the batch in chunks of this many samples, loss over the whole global batch
    # (gradient cache): activation memory follows the chunk, not the batch; 0 = off. The same
    # steps either way: a run may resume on a smaller device with a chunk size
    chunk_size: int = field(default=0, metadata=RESUME_FREE)
    grad_accum: int = 1
    log_every: int = field(default=10, metadata=RESUME_FREE)
    # optimizer steps; 0 = after every epoch
    eval_every: int = field(default=0, metadata=RESUME_FREE)
    # optimizer steps; 0 = only at the end
    ckpt_every: int = field(default=500, metadata=RESUME_FREE)
    keep_checkpoints: int = field(default=2, metadata=RESUME_FREE)
    seed: int = 1234
    # auto: newest complete checkpoint in out_dir
    resume: Literal["auto", "none"] = field(default="auto", metadata=RESUME_FREE)
    init_from: str = ""  # exported model directory to start from (e.g. a pretraining stage)
    stage: Literal["covr", "itc"] = "covr"  # itc: image-text contrastive pretraining on captions
    # micro-batches whose loss is NaN / Inf skipped (no backward, no step) before the job stops
    nonfinite_limit: int = field(default=10, metadata=RESUME_FREE)

    def check(self) -> None:
        positive(self, "batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints")
        non_negative(self, "global_batch_size", "chunk_size", "max_steps", "nonfinite_limit")
        non_negative(self, "eval_every", "ckpt_every")


@dataclass
class TrackingConfig:
    """Where runs are logged; none of it changes the training (a run may resume elsewhere)."""

    # "" = $MLFLOW_TRACKING_URI, else sqlite:///<train.out_dir>/mlflow.db
    uri: str = field(default="", metadata=RESUME_FREE)
    experiment: str = field(default="covr-train", metadata=RESUME_FREE)
    run_name: str = field(default="", metadata=RESUME_FREE)
    # a sweep's run: this run becomes its child
    parent_run_id: str = field(default="", metadata=RESUME_FREE)
    # new experiment's artifacts; "" = <store dir>/mlartifacts (SQLite)
    artifact_location: str = field(default="", metadata=RESUME_FREE)
    # the export registered as a new version of this MLflow registered model ("" = not)
    registered_model: str = field(default="covr", metadata=RESUME_FREE)
    # each node's CPU, memory, GPU, disk and network every this many seconds, under the run as
    # system/node<i>-<host>/... (0 = off)
    system_metrics_s: float = field(default=10.0, metadata=RESUME_FREE)

    def check(self) -> None:
        non_negative(self, "system_metrics_s")


@dataclass
class EvalConfig:
    """Validation during training; it reads the model and changes nothing of it."""

    # recall@K of validation; [] = eval.protocols.KS
    ks: list[int] = field(default_factory=list, metadata=RESUME_FREE)
    batch_size: int = field(default=64, metadata=RESUME_FREE)
    # val queries in the end-of-training report (0: none)
    report_queries: int = field(default=8, metadata=RESUME_FREE)
    # edit tokens at evaluation (longest padding): the reference's test scripts' 64
    text_tokens: int = field(default=64, metadata=RESUME_FREE)

    def check(self) -> None:
        positive(self, "batch_size", "text_tokens")
        non_negative(self, "report_queries")
        if self.ks and min(self.ks) < 1:  # [] = the protocol's own list
            raise FieldError("ks", f"ranks must be >= 1, got {list(self.ks)}")


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

    def check(self) -> None:
        if self.loss.hn_nce == "reference" and self.queue.size:
            raise FieldError(
                "loss.hn_nce",
                "'reference' has no queue (the reference code has none): set queue.size=0",
            )


def validate(cfg, prefix: str = ""):
    """Value checks the types cannot express (choices are `Literal` fields, checked by OmegaConf):
    each section's own `check`, nested sections first in declaration order; a failure names its
    full key."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    if hasattr(cfg, "check"):
        try:
            cfg.check()
        except FieldError as err:
            raise ConfigError(f"key '{prefix}{err.name}': {err}") from None
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
