"""The training loop: one function, `train(cfg)`, used by `deepspeed launch/train.py` and by the
Ray Tune trials. Read it top to bottom: set-up, resume, the step loop, evaluation, checkpoints,
export."""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from configs.schema import Config, to_dict
from eval.protocols import EvalSettings, Evaluation, webvid_covr
from eval.report import write_report
from sharding.groups import read_groups
from sharding.pack import read_manifest
from sharding.reader import ShardReader, shard_urls
from train import checkpoint as ckpt
from train.batch import collate
from train.engine import (
    build_engine,
    deepspeed_config,
    enable_activation_checkpointing,
    init_distributed,
)
from train.models import build_model
from train.objective import covr_loss, itc_loss
from train.optim import build_optimizer, build_scheduler
from train.queue import MomentumEncoder, TargetQueue
from train.tokenizer import load_tokenizer
from train.tracking import Tracker, default_uri

log = logging.getLogger(__name__)


def split_shards(cfg: Config, split: str) -> tuple[list[str], list[int]]:
    shard_dir = Path(cfg.shards.dir) / split
    return shard_urls(shard_dir, read_manifest(shard_dir))


def build_model_and_tokenizer(cfg: Config):
    if cfg.train.init_from:
        overrides = {
            k: getattr(cfg.model, k)
            for k in ("combiner", "freeze_vision", "train_target_encoder", "reduce")
        }
        return ckpt.load_exported(cfg.train.init_from, **overrides)
    tok_dir = cfg.model.tokenizer or cfg.model.pretrained
    if not tok_dir:
        raise ValueError(
            "model.tokenizer (or model.pretrained) must name a local tokenizer directory"
        )
    tok = load_tokenizer(tok_dir)
    return build_model(cfg.model, tok), tok


def validate(engine_module, tok, cfg: Config, rank: int, world: int) -> Evaluation:
    """WebVid-CoVR protocol on the val shards (every rank embeds its share)."""
    settings = EvalSettings(ks=tuple(cfg.eval.ks), reduce=cfg.model.reduce,
                            batch_size=cfg.eval.batch_size, rank=rank, world=world)  # fmt: skip
    return webvid_covr(engine_module, tok, Path(cfg.shards.dir) / "val", settings)


def train(cfg: Config) -> dict:
    # --- set-up: processes, model, data, engine -------------------------------------------
    rank, world, _ = init_distributed(cfg.deepspeed.timeout_s)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (and EMA copy)
    out = Path(cfg.train.out_dir)
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)

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

    image_size = model.hf.config.vision_config.image_size
    batch_collate = partial(
        collate, tokenizer=tok, image_size=image_size, max_text_len=cfg.model.max_text_len
    )
    urls, counts = split_shards(cfg, "train")
    reader = ShardReader(
        urls, counts, batch_size=cfg.train.batch_size, collate=batch_collate, rank=rank, world=world,
        sampler=cfg.sampler.kind, sampler_buffer=cfg.sampler.buffer, sampler_beta=cfg.sampler.beta,
        seed=cfg.train.seed, allow_pipe=cfg.shards.allow_pipe, groups=read_groups(Path(cfg.shards.dir) / "train"),
    )  # fmt: skip
    workers = cfg.shards.loader_workers
    reader.set_position(0, 0, workers)
    steps_per_epoch = reader.batches_per_epoch() // cfg.train.grad_accum
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    torch.manual_seed(cfg.train.seed + rank)  # per-rank randomness (dropout) from here on
    params = model.trainable_parameters()
    optimizer = None if cfg.deepspeed.offload_optimizer else build_optimizer(params, cfg.optim)
    engine, optimizer, scheduler = build_engine(
        model,
        params,
        optimizer,
        partial(build_scheduler, cfg=cfg.optim, total_steps=total_steps),
        deepspeed_config(cfg),
    )  # the engine steps the schedule at each optimizer step and checkpoints it

    # --- resume ---------------------------------------------------------------------------
    step, epoch, batch_in_epoch, run_id = 0, 0, 0, None
    tags = ckpt.complete_tags(ckpt_dir) if cfg.train.resume == "auto" else []
    if tags:
        state = ckpt.load_checkpoint(engine, ckpt_dir, tags[-1])
        step, epoch, batch_in_epoch, run_id = (
            state["step"],
            state["epoch"],
            state["batch_in_epoch"],
            state["run_id"],
        )
        if queue is not None:
            queue.load_state_dict(state["queue"])
        if momentum is not None:
            momentum.load_state_dict(state["momentum"])
        log.info(
            "resumed from %s: step %d, epoch %d, batch %d", tags[-1], step, epoch, batch_in_epoch
        )

    tracker = Tracker(cfg.tracking.uri or default_uri(out), cfg.tracking.experiment, out, cfg.tracking.run_name,
                      run_id=run_id, enabled=rank == 0, parent_run_id=cfg.tracking.parent_run_id or None)  # fmt: skip
    if run_id is None:
        tracker.log_params(to_dict(cfg))
    if rank == 0:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    def save(step_now: int) -> None:
        state = {
            "step": step_now, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "run_id": tracker.run_id,
            "queue": queue.state_dict() if queue is not None else None,
            "momentum": momentum.state_dict() if momentum is not None else None,
        }  # fmt: skip
        ckpt.save_checkpoint(engine, ckpt_dir, step_now, state, cfg.train.keep_checkpoints)

    def log_validation(metrics: dict, at: int) -> None:
        """MLflow, plus one line in validation.jsonl (what a Tune trial follows)."""
        tracker.log_metrics(metrics, at)
        if rank == 0:
            line = {"step": at, "metrics": metrics, "mlflow_run_id": tracker.run_id}
            with (out / "validation.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")

    # --- the step loop --------------------------------------------------------------------
    loss_fn = itc_loss if cfg.train.stage == "itc" else covr_loss
    last_metrics: dict = {}

    def fresh_window() -> dict:  # what the next logged line averages over
        return {"loss": 0.0, "n": 0, "samples": 0, "wait": 0.0, "start": time.perf_counter()}

    window = fresh_window()
    while step < total_steps:
        reader.set_position(epoch, batch_in_epoch, workers)
        # own generator: starting workers must not draw from the global RNG (dropout), or a
        # resumed run, which starts its loader at another point, would diverge
        seeded = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)
        loader = DataLoader(reader, batch_size=None, num_workers=workers, generator=seeded)
        fetch_start = time.perf_counter()
        for batch in loader:
            window["wait"] += time.perf_counter() - fetch_start
            reader_stats = batch.pop("reader_stats")
            batch.pop("keys")
            loss, metrics = loss_fn(engine, batch, cfg.loss, queue, momentum)
            engine.backward(loss)
            engine.step()
            batch_in_epoch += 1
            window["loss"] += metrics["loss"].item()
            window["n"] += 1
            window["samples"] += batch["target_ids"].shape[0] * world
            if engine.global_steps == step:  # inside a gradient accumulation: no optimizer step yet
                fetch_start = time.perf_counter()
                continue
            step = engine.global_steps
            if momentum is not None:
                momentum.update()
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window["start"]
                last_metrics = {
                    "loss": window["loss"] / window["n"],
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": window["samples"] / elapsed,
                    "data_wait_s": window["wait"],
                    "epoch": epoch + batch_in_epoch / max(1, reader.batches_per_epoch()),
                    **{f"reader_{k}": v for k, v in reader_stats.items() if k != "worker"},
                }
                if "combiner_weights" in metrics:
                    for name, w in zip(
                        ("fusion", "image", "text"), metrics["combiner_weights"].mean(0).tolist()
                    ):
                        last_metrics[f"combiner_weight_{name}"] = w
                if queue is not None:
                    last_metrics["queue_filled"] = queue.filled
                tracker.log_metrics(last_metrics, step)
                if rank == 0:
                    log.info(
                        "step %d/%d %s",
                        step,
                        total_steps,
                        {k: round(v, 4) for k, v in last_metrics.items()},
                    )
                window = fresh_window()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                log_validation(validate(engine.module, tok, cfg, rank, world).metrics, step)
            if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < total_steps:
                save(step)
            if step >= total_steps:
                break
            fetch_start = time.perf_counter()
        else:  # the epoch ran to its end
            epoch, batch_in_epoch = epoch + 1, 0
            if not cfg.train.eval_every:
                log_validation(validate(engine.module, tok, cfg, rank, world).metrics, step)
            continue
        break

    # --- end: final checkpoint, validation, export ------------------------------------------
    save(step)
    evaluation = validate(engine.module, tok, cfg, rank, world)
    final = evaluation.metrics
    log_validation(final, step)
    export_dir = out / "export"
    tag = ckpt.complete_tags(ckpt_dir)[-1]
    state_dict = (
        ckpt.consolidated_state_dict(engine, ckpt_dir, tag, cfg.deepspeed.zero_stage)
        if rank == 0
        else None
    )
    if rank == 0:
        ckpt.export_model(state_dict, cfg.model, tok, export_dir)
    torch.distributed.barrier()
    summary = {"steps": step, "val": final, "export": str(export_dir), "mlflow_run_id": tracker.run_id,
               "mlflow_tracking_uri": tracker.uri, "train": last_metrics}  # fmt: skip
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        tracker.log_artifact(out / "summary.json")
        tracker.log_artifact(out / "config.json")
        if cfg.eval.report_queries:  # what the model retrieves, beside the numbers
            for path in write_report(evaluation, out / "report", n=cfg.eval.report_queries):
                tracker.log_artifact(path, "report")
    tracker.finish()
    return summary
