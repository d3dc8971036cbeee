from pathlib import Path

import pytest
import torch

from configs import load_config
from sharding.batch import Task
from tests.tiny import tiny_model
from train.engine import deepspeed_config, enable_activation_checkpointing
from train.optim import cosine_factor


def test_deepspeed_config_follows_the_project_config():
    cfg = load_config(
        None,
        [
            "deepspeed.zero_stage=3",
            "deepspeed.precision=bf16",
            "deepspeed.offload_optimizer=true",
            "train.batch_size=8",
            "train.grad_accum=4",
            "optim.grad_clip=1.0",
            "optim.lr=3e-5",
        ],
    )
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4)
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 3e-5
    plain = deepspeed_config(load_config())
    assert "optimizer" not in plain and plain["gradient_clipping"] == 0.0  # DeepSpeed's own: 1.0


def test_cosine_schedule_with_warmup():
    assert cosine_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_factor(55, 100, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_factor(100, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_activation_checkpointing_recomputes_and_keeps_the_gradients(tmp_path):
    torch.manual_seed(0)
    model, _ = tiny_model(tmp_path, train_target_encoder=True)  # gradients on the target path
    for m in model.modules():  # training mode (checkpointing is active only then), no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    calls = []
    model.hf.qformer.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    model(Task.ENCODE_TARGET_FRAMES, x).sum().backward()
    expected, plain_calls = model.hf.query_tokens.grad.clone(), len(calls)
    model.zero_grad()
    calls.clear()
    enable_activation_checkpointing(model)
    model(Task.ENCODE_TARGET_FRAMES, x).sum().backward()
    assert len(calls) == 2 * plain_calls  # forward, then recomputed in the backward pass
    assert torch.allclose(model.hf.query_tokens.grad, expected, atol=1e-4)


def _engine_matches_plain_torch(rank, world, out_dir):
    """One rank, ZeRO-0: the engine skips its self-all-reduce and still takes exactly the steps
    of a plain PyTorch loop; under ZeRO-2 the reduction is left to DeepSpeed."""
    import copy

    from bench.train_bench import make_batch
    from configs.schema import LossConfig
    from train.engine import build_engine, init_distributed
    from train.objective import covr_loss

    def sgd(params):  # linear in the gradients: Adam would magnify float-rounding differences
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)

    init_distributed(60)
    torch.manual_seed(0)
    model, tok = tiny_model(Path(out_dir))
    model.eval()  # no dropout: the two runs must match step for step
    plain = copy.deepcopy(model)
    batch = make_batch(tok, 4, model.cfg.embed_dim, model.cfg.num_query_tokens, frames=2)
    config = deepspeed_config(load_config(None, ["train.batch_size=4", "deepspeed.zero_stage=0"]))
    params = model.trainable_parameters()
    engine, *_ = build_engine(model, params, sgd(params), None, config)
    assert not engine.enable_backward_allreduce
    engine.eval()  # deepspeed.initialize sets training mode
    opt = sgd(plain.trainable_parameters())
    for _ in range(3):
        loss, _ = covr_loss(engine, batch, LossConfig())
        engine.backward(loss)
        engine.step()
        ref, _ = covr_loss(plain, batch, LossConfig())
        opt.zero_grad()
        ref.backward()
        opt.step()
        assert torch.allclose(loss, ref, atol=1e-5)
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    torch.manual_seed(0)
    model, _ = tiny_model(Path(out_dir))
    params = model.trainable_parameters()
    config["zero_optimization"]["stage"] = 2
    engine, *_ = build_engine(model, params, torch.optim.AdamW(params), None, config)
    assert engine.enable_backward_allreduce


def test_engine_on_one_rank_matches_a_plain_loop(tmp_path):
    from tests.multirank import run_ranks

    run_ranks(_engine_matches_plain_torch, 1, (str(tmp_path),))
