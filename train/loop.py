"""The training loop, `train(cfg)`, used by `deepspeed launch/train.py` and by the Ray Tune trials.

Read it top to bottom: `train` is the whole loop; `build` makes the job (processes, model, data
loader, the checkpointer and what it restored, the run's shape, engine, tracking);
`train_epoch` runs micro-steps from the loader's position; `micro_step` is one forward/backward; `after_step` runs at each optimizer step (EMA,
log line, validation, checkpoint); `finish` saves, validates, exports and writes the summary.
Rank 0 speaks for the job on the console."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from configs.schema import Config, ModelConfig, marked, per_rank_batch_size, to_dict
from data.tokenizer import load_tokenizer
from eval.protocols import EvalSettings, Evaluation, webvid_covr
from eval.report import write_report
from sharding.batch import augment, collate, pin_memory_for, to_device
from sharding.embed import EmbedError, check_embedded
from sharding.groups import read_groups
from sharding.mix import Source, epoch_shards
from sharding.reader import ShardReader, ShardSet, open_shards
from sharding.remote import Fetch, join
from train.checkpoint import step_tag
from train.checkpointer import Checkpointer
from train.engine import (
    build_engine,
    deepspeed_config,
    enable_activation_checkpointing,
    init_distributed,
    model_device,
)
from train.export import consolidated_state_dict, export_model, load_exported
from train.gradcache import chunked_backward
from train.loader import RunShape, TrainLoader, run_shape
from train.models import build_model
from train.nonfinite import check_finite_weights, finite_loss, skip_nonfinite
from train.objective import COVR, ITC, Objective
from train.optim import build_optimizer, build_scheduler
from train.queue import MomentumEncoder, TargetQueue
from train.run_lock import lock_run_dir
from train.state import TrainState
from train.stop import Stopped, StopRequest
from train.system_metrics import start_system_metrics
from train.tracking import Tracker, default_uri

log = logging.getLogger(__name__)


def train(cfg: Config, stop: StopRequest | None = None) -> dict | None:
    """Train, validate and export; returns the summary on rank 0 (None on the other ranks).
    A stop signal (`train.stop`) ends it at an optimizer-step boundary with a checkpoint, by
    raising `Stopped`. `stop`: the process's installed request (`launch/train.py` keeps it to
    the process's end: a signal after training must not kill a job that finished); without
    one, the signals are caught for the call only."""
    rank, world, _ = init_distributed(cfg.deepspeed.timeout_s)
    lock = lock_run_dir(cfg.train.out_dir, rank)  # one job per out_dir, before it is touched
    own = stop is None
    stop = StopRequest().install() if own else stop
    job = None
    try:
        if rank == 0:
            log.info("building the job: model, data reader, DeepSpeed engine")
        job = build(cfg, rank, world, stop)
        meter = Meter()
        if job.state.validation_due:  # the stopped job's validation at this step
            log_validation(job, validate(job).metrics)
            job.state.validation_due = False
        while job.state.step < job.shape.total_steps and not job.stopped:
            train_epoch(job, meter)
            if job.state.step < job.shape.total_steps and not job.stopped:  # the epoch is spent
                end_epoch(job)
        if job.stopped:
            stopped(job)
        return finish(job, meter)
    finally:
        if job is not None and job.system is not None:
            job.system.finish()
        if own:
            stop.uninstall()
        if lock is not None:
            lock.release()


@dataclass
class Job:
    """What `build` makes and the step functions use."""

    cfg: Config
    rank: int
    world: int
    out: Path
    engine: object  # deepspeed.DeepSpeedEngine (model, optimizer, schedule)
    scheduler: object
    tok: object
    loader: TrainLoader  # the data and its position (epoch, batch, records consumed)
    objective: Objective  # the loss, in two halves (embed, contrast)
    state: TrainState  # optimizer steps, MLflow run id
    queue: TargetQueue | None
    momentum: MomentumEncoder | None  # the EMA copy that feeds the queue
    checkpointer: Checkpointer
    tracker: Tracker
    shape: RunShape
    val: ShardSet  # the validation split, opened once
    stop: StopRequest  # the signals' flag
    system: object | None = None  # this node's MLflow system-metrics monitor
    stopped: str | None = None  # the signal the ranks agreed to stop on, at a step boundary

    def say(self, msg: str, *args) -> None:
        if self.rank == 0:
            log.info(msg, *args)


class Meter:
    """What the next log line averages over, and the time-left estimate. The loss is summed on
    the device and read only when a line is logged (`.item()` waits for the device)."""

    def __init__(self):
        self.reset()
        self.since: tuple[int, float] | None = None  # (step, time) after this process's 1st step
        self.logged: dict = {}  # the last logged metrics (for the summary)

    def reset(self) -> None:
        self.loss, self.micro_steps, self.samples, self.data_wait_s = None, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss = loss if self.loss is None else self.loss + loss
        self.micro_steps, self.samples = self.micro_steps + 1, self.samples + samples

    def stepped(self, step: int) -> None:
        if self.since is None:  # the first step carries start-up costs: time from after it
            self.since = (step, time.perf_counter())

    def seconds_left(self, step: int, total: int) -> float | None:
        if self.since is None or step <= self.since[0]:
            return None
        per_step = (time.perf_counter() - self.since[1]) / (step - self.since[0])
        return per_step * (total - step)


# --- build ---------------------------------------------------------------------------------


def open_split(cfg: Config, split: str, model) -> ShardSet:
    """The split's shards, their manifest read once for the run; shards holding precomputed
    targets are checked to come from the model's frozen target path."""
    shards = open_shards(join(cfg.shards.dir, split), Fetch.from_config(cfg.shards))
    check_embedded(shards.manifest, shards.dir, model)
    return shards


def mix_sources(cfg: Config, model) -> list[Source]:
    """`shards.mix`'s weighted train splits, each checked like a single one; their targets must
    be of one kind (all frames, or all embedded by the same model or release)."""
    sources, kinds = [], {}
    for i, entry in enumerate(cfg.shards.mix):
        shards = open_shards(entry.dir, Fetch.from_config(cfg.shards))
        check_embedded(shards.manifest, shards.dir, model)
        kinds[entry.dir] = (shards.manifest.get("embedded") or {}).get("fingerprint", "frames")
        sources.append(
            Source(
                f"{i}-{Path(entry.dir).name}",
                shards.urls,
                shards.counts,
                entry.weight,
                shards.checksums,
                shards.sizes,
            )
        )
    if len(set(kinds.values())) > 1:
        raise EmbedError(
            "shards.mix: sources hold targets of different kinds (one batch cannot mix them): "
            + ", ".join(f"{d}: {k}" for d, k in kinds.items())
        )
    return sources


def build_model_and_tokenizer(cfg: Config):
    if cfg.train.init_from:
        overrides = {k: getattr(cfg.model, k) for k in marked(ModelConfig, "export_override")}
        return load_exported(cfg.train.init_from, **overrides)
    tok_dir = cfg.model.tokenizer or cfg.model.pretrained
    if not tok_dir:
        raise ValueError(
            "model.tokenizer (or model.pretrained) must name a local tokenizer directory"
        )
    tok = load_tokenizer(tok_dir)
    return build_model(cfg.model, tok), tok


def build_loader(cfg: Config, model, tok, rank: int, world: int, batch_size: int, device):
    """The training split's reader (checked to hold this model's target embeddings, if any)
    inside its loader, at the start of the run."""
    image_size = model.hf.config.vision_config.image_size
    batch_collate = partial(
        collate,
        tokenizer=tok,
        image_size=image_size,
        max_text_len=cfg.model.max_text_len,
        caption=cfg.model.caption_tokenization(),
        edit_words=cfg.model.edit_words,
        description=cfg.model.description,
        description_tokens=cfg.model.description_tokens,
    )
    # before ZeRO-3 partitions the weights: the target check reads them
    mix = mix_sources(cfg, model) if cfg.shards.mix else None
    train = None if mix else open_split(cfg, "train", model)
    reader = ShardReader(
        [] if mix else train.urls,
        [] if mix else train.counts,
        batch_size=batch_size,
        collate=batch_collate,
        sampler=cfg.sampler,
        rank=rank,
        world=world,
        seed=cfg.train.seed,
        allow_pipe=cfg.shards.allow_pipe,
        groups=None if mix else read_groups(join(cfg.shards.dir, "train")),
        augment=partial(augment, **vars(cfg.augment)),
        mix=mix,
        checksums=None if mix else train.checksums,
        sizes=None if mix else train.sizes,
        fetch=Fetch.from_config(cfg.shards),
    )
    if mix and rank == 0:
        planned = epoch_shards(mix, 0, cfg.train.seed).quotas
        total = sum(planned)
        log.info(
            "shards.mix: records per epoch %s",
            ", ".join(f"{s.name} {n} ({100 * n / total:.1f}%)" for s, n in zip(mix, planned)),
        )
    return TrainLoader(reader, cfg.shards.loader_workers, cfg.train.seed, pin_memory_for(device))


def build(cfg: Config, rank: int, world: int, stop: StopRequest) -> Job:
    """Model, queue and EMA copy, data loader; the stateful parts restored from the newest
    complete checkpoint (`train.resume=auto`); the run's shape; engine; the MLflow run (a
    resumed job continues its run)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (and EMA copy)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch_size = per_rank_batch_size(cfg, world)  # from train.global_batch_size if set

    model, tok = build_model_and_tokenizer(cfg)
    if cfg.deepspeed.activation_checkpointing:
        enable_activation_checkpointing(model)
    momentum = None
    if cfg.queue.size and cfg.model.train_target_encoder:
        momentum = MomentumEncoder(model, cfg.queue.momentum)  # before ZeRO partitions the model
    # the queue holds what the loss compares against: the token mean, or all target tokens
    tokens = (
        1
        if cfg.model.reduce == "mean" or cfg.model.arch == "blip"
        else model.hf.config.num_query_tokens
    )
    dim = model.hf.config.image_text_hidden_size
    queue = TargetQueue(cfg.queue.size, (tokens, dim)) if cfg.queue.size else None
    loader = build_loader(cfg, model, tok, rank, world, batch_size, model_device())
    val = open_split(cfg, "val", model)
    state = TrainState()
    parts = {"train": state, "loader": loader, "queue": queue, "ema": momentum}
    checkpointer = Checkpointer(out / "checkpoints", cfg, parts, world)
    restored = checkpointer.restore()  # before the engine: its schedule needs the run's length
    shape = run_shape(cfg, world, batch_size, loader, state.step)

    torch.manual_seed(cfg.train.seed + rank)  # per-rank randomness (dropout) from here on
    params = model.trainable_parameters()
    optimizer = None if cfg.deepspeed.offload_optimizer else build_optimizer(params, cfg.optim)
    engine, optimizer, scheduler = build_engine(
        model,
        params,
        optimizer,
        partial(
            build_scheduler,
            cfg=cfg.optim,
            total_steps=shape.total_steps,
            steps_per_epoch=shape.steps_per_epoch,
        ),
        deepspeed_config(cfg, batch_size, load_universal=bool(restored and restored.universal)),
    )  # the engine steps the schedule at each optimizer step and checkpoints it
    checkpointer.restore_engine(engine)  # model, optimizer, schedule; this rank's RNG

    tracker = Tracker(
        cfg.tracking.uri or default_uri(out),
        cfg.tracking.experiment,
        out,
        cfg.tracking.run_name,
        run_id=state.run_id,
        enabled=rank == 0,
        parent_run_id=cfg.tracking.parent_run_id or None,
        artifact_location=cfg.tracking.artifact_location or None,
    )
    tracker.log_params(to_dict(cfg))  # a resumed run: compared with the run's, new keys only
    system = start_system_metrics(
        tracker.run_id, tracker.uri, cfg.tracking.system_metrics_s, resumed=restored is not None
    )
    if rank == 0:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        (out / "stopped.json").unlink(missing_ok=True)  # an earlier stop's, now resumed

    objective = ITC if cfg.train.stage == "itc" else COVR
    job = Job(
        cfg,
        rank,
        world,
        out,
        engine,
        scheduler,
        tok,
        loader,
        objective,
        state,
        queue,
        momentum,
        checkpointer,
        tracker,
        shape,
        val,
        stop,
        system,
    )
    for line in checkpointer.describe():
        job.say(line)
    if restored:
        job.say("at step %d, epoch %d, batch %d", state.step, loader.epoch, loader.batch_in_epoch)
    if loader.describe_move():
        job.say(loader.describe_move())
    job.say(
        "training %d steps (%d per epoch) on %d rank(s), %d samples per step",
        shape.total_steps,
        shape.steps_per_epoch,
        world,
        shape.samples_per_step,
    )
    return job


# --- steps ---------------------------------------------------------------------------------


def train_epoch(job: Job, meter: Meter) -> None:
    """Micro-steps from the loader's position until the epoch's batches are spent, the last
    optimizer step is done, or the ranks agreed to stop."""
    state, batches = job.state, iter(job.loader)
    while state.step < job.shape.total_steps and not job.stopped:
        waited = time.perf_counter()
        batch = next(batches, None)
        meter.data_wait_s += time.perf_counter() - waited
        if batch is None:
            return
        metrics = micro_step(job, batch, meter)
        if metrics is None:  # a NaN / Inf loss: skipped, counted
            continue
        if job.engine.global_steps > state.step:  # the optimizer stepped (every grad_accum)
            state.step = job.engine.global_steps
            after_step(job, metrics, meter)


def micro_step(job: Job, batch: dict, meter: Meter) -> dict | None:
    """Forward and backward of one micro-batch; the engine applies the optimizer at the end of
    each gradient accumulation. A NaN / Inf loss (on any rank) skips the micro-batch before its
    backward (`train.nonfinite`): returns None."""
    batch = to_device(batch, job.engine.device)
    engine, cfg = job.engine, job.cfg
    if cfg.train.chunk_size:  # gradient cache: activation memory follows the chunk
        metrics = chunked_backward(
            engine,
            batch,
            job.objective,
            cfg.loss,
            cfg.train.chunk_size,
            job.queue,
            job.momentum,
            finite=finite_loss,
        )[1]
    else:
        loss, metrics = job.objective.loss(engine, batch, cfg.loss, job.queue, job.momentum)
        if finite_loss(loss):
            engine.backward(loss)
        else:
            metrics = None
    if metrics is None:
        job.state.nonfinite_skipped = skip_nonfinite(
            job.state.nonfinite_skipped,
            cfg.train.nonfinite_limit,
            job.state.step,
            job.loader.last_keys,
        )
        return None
    engine.step()
    meter.add(metrics["loss"], batch["target_ids"].shape[0] * job.world)
    return metrics


def after_step(job: Job, metrics: dict, meter: Meter) -> None:
    """At each optimizer step: EMA update, then (when due) log line, validation, checkpoint."""
    cfg, step = job.cfg.train, job.state.step
    meter.stepped(step)
    if job.momentum is not None:
        job.momentum.update()
    if step % cfg.log_every == 0 or step == job.shape.total_steps:
        log_progress(job, metrics, meter)
    last = step == job.shape.total_steps  # `finish` validates and saves
    # a stop signal, agreed by every rank here and after a validation or checkpoint, which a
    # signal may have come during: the stop is at this step, with its checkpoint
    agreed = lambda: None if last else job.stop.agreed()  # noqa: E731
    job.stopped = agreed()
    if cfg.eval_every and step % cfg.eval_every == 0:
        if job.stopped:  # saved as due: the resumed job validates first, at this step
            job.state.validation_due = True
        else:
            log_validation(job, validate(job).metrics)
            job.stopped = agreed()
    if job.stopped or (cfg.ckpt_every and step % cfg.ckpt_every == 0 and not last):
        save(job)
        job.stopped = job.stopped or agreed()


def end_epoch(job: Job) -> None:
    job.loader.next_epoch()
    if not job.cfg.train.eval_every:  # validation after every epoch
        log_validation(job, validate(job).metrics)


# --- what a step reports and keeps ------------------------------------------------------------


def log_progress(job: Job, metrics: dict, meter: Meter) -> None:
    """One MLflow record and one console line per `train.log_every` steps; the window restarts."""
    state, loader = job.state, job.loader
    elapsed = time.perf_counter() - meter.start
    logged = {
        "loss": (meter.loss / meter.micro_steps).item(),  # (the non-finite check reads each)
        "lr": job.scheduler.get_last_lr()[0],
        "samples_per_s": meter.samples / elapsed,
        "data_wait_s": meter.data_wait_s,
        "epoch": loader.epoch + loader.batch_in_epoch / max(1, loader.batches_per_epoch()),
        **{f"reader_{k}": v for k, v in loader.stats.items() if k != "worker"},
        **{f"data_share_{name}": share for name, share in loader.shares().items()},
    }
    if "combiner_weights" in metrics:
        weights = metrics["combiner_weights"].mean(0).tolist()
        for name, w in zip(("fusion", "image", "text"), weights):
            logged[f"combiner_weight_{name}"] = w
    if job.queue is not None:
        logged["queue_filled"] = job.queue.filled
    if state.nonfinite_skipped:
        logged["nonfinite_skipped"] = state.nonfinite_skipped
    job.tracker.log_metrics(logged, state.step)
    left = meter.seconds_left(state.step, job.shape.total_steps)
    skipped = {k: v for k, v in loader.stats.items() if k != "worker" and v}
    job.say(
        "step %d/%d  epoch %.2f  loss %.4f  lr %.2e  %.1f samples/s  data wait %.1fs  %s%s",
        state.step,
        job.shape.total_steps,
        logged["epoch"],
        logged["loss"],
        logged["lr"],
        logged["samples_per_s"],
        logged["data_wait_s"],
        "left " + _duration(left) if left is not None else "left ?",
        f"  reader {skipped}" if skipped else "",
    )
    meter.logged = logged
    meter.reset()


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def validate(job: Job) -> Evaluation:
    """WebVid-CoVR protocol on the val shards (every rank embeds its share)."""
    c = job.cfg
    settings = EvalSettings(
        ks=tuple(c.eval.ks),
        reduce=c.model.reduce,
        batch_size=c.eval.batch_size,
        rank=job.rank,
        world=job.world,
        text_len=c.eval.text_tokens,
    )
    return webvid_covr(job.engine.module, job.tok, job.val, settings)


def log_validation(job: Job, metrics: dict) -> None:
    """MLflow, one line in validation.jsonl (what a Tune trial follows) and on the console."""
    step = job.state.step
    job.tracker.log_metrics(metrics, step)
    if job.rank == 0:
        line = {"step": step, "metrics": metrics, "mlflow_run_id": job.tracker.run_id}
        with (job.out / "validation.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
    job.say(
        "validation at step %d: %s", step, "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    )


def save(job: Job) -> str:
    """A checkpoint at this step (and, through it, the export): never of non-finite weights."""
    check_finite_weights(job.engine.module, f"checkpoint at step {job.state.step}")
    job.tracker.spill()  # the records of the steps before it on disk, whatever happens next
    job.state.run_id = job.tracker.run_id  # created late if the server was away at the start
    tag = job.checkpointer.save(job.state.step)
    job.say("checkpoint saved: %s", job.checkpointer.dir / tag)
    return tag


# --- end ---------------------------------------------------------------------------------------


def stopped(job: Job) -> None:
    """After a stop signal: the checkpoint is saved (`after_step`); the MLflow run is marked
    KILLED with the reason (the resumed job reopens it), rank 0 writes `stopped.json` for a
    requeue script; raises `Stopped`."""
    step = job.state.step
    tag = job.checkpointer.dir / step_tag(step)
    if job.rank == 0:
        reason = {"signal": job.stopped, "step": step, "checkpoint": str(tag)}
        (job.out / "stopped.json").write_text(json.dumps(reason, indent=1))
        job.tracker.set_tags({"covr.stopped": f"{job.stopped} at step {step}"})
    job.tracker.finish("KILLED")
    torch.distributed.barrier()  # every rank's part of the checkpoint is written
    raise Stopped(job.stopped, step, str(tag))


def finish(job: Job, meter: Meter) -> dict | None:
    """Final checkpoint and validation, the export (transformers format), the summary and the
    retrieval report (rank 0)."""
    cfg, out, rank = job.cfg, job.out, job.rank
    tag = save(job)
    # a signal at the last step: the final checkpoint is saved; validation and export (minutes
    # on a real model) are the resumed job's, which finds the run at its end
    job.stopped = job.stop.agreed()
    if job.stopped:
        stopped(job)
    evaluation = validate(job)
    final = evaluation.metrics
    log_validation(job, final)
    export_dir = out / "export"
    if rank == 0:
        zero = cfg.deepspeed.zero_stage
        state_dict = consolidated_state_dict(job.engine, job.checkpointer.dir, tag, zero)
        export_model(state_dict, cfg.model, job.tok, export_dir)
        job.say("exported the model (transformers format): %s", export_dir)
    torch.distributed.barrier()
    tracker = job.tracker
    summary = {
        "steps": job.state.step,
        "val": final,
        "export": str(export_dir),
        "mlflow_run_id": tracker.run_id,
        "mlflow_tracking_uri": tracker.uri,
        "train": meter.logged,
    }
    if rank == 0:
        summary["registered"] = tracker.register_model(
            cfg.tracking.registered_model, export_dir, {"step": job.state.step, **final}
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        tracker.log_artifact(out / "summary.json")
        tracker.log_artifact(out / "config.json")
        if cfg.eval.report_queries:  # what the model retrieves, beside the numbers
            for path in write_report(evaluation, out / "report", n=cfg.eval.report_queries):
                tracker.log_artifact(path, "report")
    tracker.finish()
    return summary if rank == 0 else None
