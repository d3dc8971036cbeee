"""DeepSpeed: the JSON config generated from the project config, distributed start-up, and the
engine around model, optimizer and schedule. The DeepSpeed config is never written by hand."""

from __future__ import annotations

import datetime
import os
import warnings

import torch

from configs.schema import Config
from train import network
from train.network import free_port  # noqa: F401  (launch/demo.py, benches)


def deepspeed_config(
    cfg: Config, per_rank_batch: int | None = None, load_universal: bool = False
) -> dict:
    """`per_rank_batch`: the micro-batch per rank (default `train.batch_size`); `load_universal`:
    the checkpoint to load is in DeepSpeed's universal format (a job resumed on another number
    of ranks)."""
    ds, tr = cfg.deepspeed, cfg.train
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": per_rank_batch or tr.batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW: no fused-Adam build on CPU
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "gradient_clipping": cfg.optim.grad_clip,  # always: DeepSpeed clips at 1.0 when unset
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if ds.offload_optimizer:  # ZeRO-Offload needs DeepSpeed's CPU Adam: name it in the config
        o = cfg.optim
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": [o.beta1, o.beta2]},
        }
    return config


def model_device() -> torch.device:
    """Where `deepspeed.initialize` puts the model: this rank's accelerator device."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def build_engine(model, params, optimizer, lr_scheduler, config: dict):
    """`deepspeed.initialize`, minus one redundant cost: without ZeRO on a single data-parallel
    rank, DeepSpeed still flattens every gradient, all-reduces it with itself and copies it back
    each step. There is nothing to average, so that pass is skipped (bench/engine_bench.py)."""
    import deepspeed

    # ZeRO's partitioned gradients go through torch's renamed all_gather_into_tensor, which
    # warns on every rank at the first step; the call is DeepSpeed's, not ours to change
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=config,
    )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def skip_cpu_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce when CPU ranks start (used only by its
    tensor-parallel inference, never here). The build takes minutes on a fresh 2-core machine,
    and a process killed mid-build leaves a lock file that every later start waits on forever."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: int) -> tuple[int, int, int]:
    """rank, world size, local rank; gloo without a GPU, NCCL with one. A process started
    without a launcher runs as a world of one; a job whose master is this machine (the local
    launcher sets MASTER_ADDR=127.0.0.1) listens on 127.0.0.1 only (train.network)."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        skip_cpu_shm_build()
    network.world_of_one_env()
    if network.is_loopback(os.environ.get("MASTER_ADDR")) and "RANK" in os.environ:
        network.init_loopback_process_group(backend, timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group above
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def enable_activation_checkpointing(model) -> None:
    """Recompute the transformer layers (Q-Former / text encoder) in the backward pass."""
    model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
