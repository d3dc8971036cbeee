"""GPU code paths that CPU-only CI cannot run, checked with mocks, the `meta` device (which
rejects mixing devices as CUDA does) and bf16 on CPU."""

import torch
from torch.overrides import TorchFunctionMode

from configs.schema import LossConfig
from sharding.batch import Task, pin_memory_for, to_device
from tests.tiny import tiny_model
from train.objective import covr_loss
from train.queue import MomentumEncoder, TargetQueue


def test_nccl_with_a_gpu_gloo_without(monkeypatch):
    import deepspeed

    from train import engine

    calls = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.update(kw))
    monkeypatch.setattr(
        engine.network, "init_loopback_process_group", lambda b, t: calls.update(loopback=b)
    )
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.update(device=i))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    for key, value in {
        "RANK": "3",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(key, value)  # a multi-node job: the addresses the user gave
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine.init_distributed(60) == (3, 8, 3)
    assert calls["dist_backend"] == "nccl" and calls["device"] == 3  # each rank its own GPU
    assert calls["timeout"].total_seconds() == 60 and "loopback" not in calls
    calls.clear()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # a local job: its group is made on loopback
    engine.init_distributed(60)
    assert calls["loopback"] == calls["dist_backend"] == "nccl"
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine.init_distributed(60)
    assert calls["dist_backend"] == "gloo" and "device" not in calls


def test_pinned_memory_only_for_cuda():
    assert pin_memory_for("cuda") and pin_memory_for(torch.device("cuda", 1))
    assert not pin_memory_for("cpu") and not pin_memory_for("meta")


class RecordTo(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.non_blocking = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            self.non_blocking.append(kwargs.get("non_blocking", False))
        return func(*args, **kwargs)


def test_batches_move_to_the_device_without_blocking():
    keys = ["a", "b"]
    batch = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "frames": torch.randn(2, 3),
        "keys": keys,
    }
    with RecordTo() as seen:
        moved = to_device(batch, "meta")
    assert moved["input_ids"].device.type == moved["frames"].device.type == "meta"
    assert moved["input_ids"].dtype == torch.long and moved["keys"] is keys
    assert seen.non_blocking == [True, True]


def test_the_loop_moves_each_batch_to_the_engine_device():
    from tests.test_loop import _job
    from train.loop import Meter, train_epoch

    job = _job(total_steps=2, accum=1, log_every=1)
    job.engine.device = torch.device("meta")  # stands for the GPU DeepSpeed put the model on
    seen = []

    class Objective:  # records where the batch is; the loss itself stays on the host
        def loss(self, engine, batch, loss_cfg, queue, momentum):
            seen.append(batch["target_ids"].device.type)
            return torch.tensor(1.0), {"loss": torch.tensor(1.0)}

    job.objective = Objective()
    train_epoch(job, Meter())
    assert seen == ["meta", "meta"]


def test_queue_mask_follows_the_batch_device():
    queue = TargetQueue(8, (1, 4))  # on the host, as the loop builds it
    queue.enqueue(torch.randn(3, 1, 4), torch.tensor([5, 6, 7]))
    mask = queue.negatives_mask(torch.tensor([6, 9], device="meta"))
    assert mask.device.type == "meta" and mask.shape == (2, 3)
    assert queue.negatives_mask(torch.tensor([6])).tolist() == [[True, False, True]]


def test_momentum_copy_follows_the_live_model_to_the_device(tmp_path):
    model, _ = tiny_model(
        tmp_path
    )  # frozen vision tower: the EMA copy reads the live tower's tokens
    ema = MomentumEncoder(model)  # built on the host, before the engine moves the model
    model._vision = lambda pixels: torch.zeros(pixels.shape[0], 17, 32, device=pixels.device)
    seen = {}

    def target_head(tokens):  # the Q-Former cannot run on `meta`; record where it would run
        seen.update(tokens=tokens.device.type, weights=next(ema.copy.parameters()).device.type)

    ema.copy.target_head = target_head
    ema.encode_target_frames(torch.zeros(2, 3, 32, 32, device="meta"))
    assert seen == {"tokens": "meta", "weights": "meta"}


def test_bf16_model_casts_inputs_and_keeps_the_loss_in_fp32(tmp_path):
    """DeepSpeed's bf16 casts the module to bf16 (no autocast); the loader's fp32 frames must be
    cast at the vision tower, the encoders run in bf16, the loss in fp32, gradients flow."""
    torch.manual_seed(0)
    model, tok = tiny_model(tmp_path)
    model.bfloat16()
    seen = {}
    patch = model.hf.vision_model.embeddings.patch_embedding
    patch.register_forward_pre_hook(lambda m, args: seen.update(pixels=args[0].dtype))
    model.hf.qformer.register_forward_hook(
        lambda m, a, out: seen.update(qformer=out.last_hidden_state.dtype)
    )
    from bench.train_bench import make_batch

    batch = make_batch(tok, 4, model.cfg.embed_dim, model.cfg.num_query_tokens, frames=2)
    batch["query_frames"] = torch.randn(4, 1, 3, 32, 32)  # fp32, as train.batch.collate makes it
    query, _ = model(
        Task.COMPOSE, batch["query_frames"], batch["input_ids"], batch["attention_mask"]
    )
    assert query.dtype == torch.bfloat16
    assert seen == {"pixels": torch.bfloat16, "qformer": torch.bfloat16}
    target = model(Task.ENCODE_TARGET, batch["target_embeddings"], batch["target_scores"])
    assert target.dtype == torch.float32  # frame pooling of packed embeddings stays fp32
    loss, _ = covr_loss(model, batch, LossConfig())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads) and all(torch.isfinite(g).all() for g in grads)
