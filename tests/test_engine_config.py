import pytest
import torch

from configs import load_config
from tests.tiny import tiny_model
from train.engine import deepspeed_config, enable_activation_checkpointing
from train.optim import cosine_factor


def test_deepspeed_config_follows_the_project_config():
    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.precision=bf16", "deepspeed.offload_optimizer=true",
                             "train.batch_size=8", "train.grad_accum=4", "optim.grad_clip=1.0", "optim.lr=3e-5"])  # fmt: skip
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4)
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 3e-5
    plain = deepspeed_config(load_config())
    assert "optimizer" not in plain and "gradient_clipping" not in plain


def test_cosine_schedule_with_warmup():
    assert cosine_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_factor(55, 100, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_factor(100, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_activation_checkpointing_recomputes_and_keeps_the_gradients(tmp_path):
    torch.manual_seed(0)
    model, _ = tiny_model(tmp_path)
    for m in model.modules():  # training mode (checkpointing is active only then), no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    calls = []
    model.hf.qformer.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    model("encode_target_frames", x).sum().backward()
    expected, plain_calls = model.hf.query_tokens.grad.clone(), len(calls)
    model.zero_grad()
    calls.clear()
    enable_activation_checkpointing(model)
    model("encode_target_frames", x).sum().backward()
    assert len(calls) == 2 * plain_calls  # forward, then recomputed in the backward pass
    assert torch.allclose(model.hf.query_tokens.grad, expected, atol=1e-4)
