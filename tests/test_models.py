import pytest
import torch

from configs.schema import LossConfig
from eval.similarity import similarity
from tests.tiny import tiny_model
from train.models import pool_frames
from train.objective import covr_loss
from train.queue import TargetQueue


def _batch(tok, b=4, fq=1, ft=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tok(["make it red", "replace circle with square", "change it to blue", "make it green"][:b],
              padding="max_length", max_length=12, truncation=True, return_tensors="pt")  # fmt: skip
    return {
        "query_frames": torch.randn(b, fq, 3, size, size, generator=g),
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "target_frames": torch.randn(b, ft, 3, size, size, generator=g),
        "target_scores": torch.rand(b, ft, generator=g),
        "target_mask": torch.ones(b, ft, dtype=torch.bool),
        "target_ids": torch.arange(b),
        "caption_input_ids": enc.input_ids,
        "caption_attention_mask": enc.attention_mask,
    }


@pytest.mark.parametrize("arch,tokens", [("blip2", 4), ("blip", 1)])
@pytest.mark.parametrize("combiner", ["fusion", "avg", "mlp"])
def test_shapes_and_normalisation(tmp_path, arch, tokens, combiner):
    model, tok = tiny_model(tmp_path, arch, combiner=combiner)
    batch = _batch(tok, fq=2)  # several query frames
    q, w = model("compose", batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    assert q.shape == (4, tokens if combiner == "fusion" else 1, 16)
    assert torch.allclose(q.norm(dim=-1), torch.ones(q.shape[:2]), atol=1e-5)
    assert (w is None) == (combiner != "mlp")
    if w is not None:
        assert w.shape == (4, 3) and torch.allclose(w.sum(1), torch.ones(4))
    t = model("encode_target", batch["target_frames"], batch["target_scores"], batch["target_mask"])
    assert t.shape == (4, tokens, 16)
    assert model("encode_text", batch["input_ids"], batch["attention_mask"]).shape == (4, 16)


@pytest.mark.parametrize("arch", ["blip2", "blip"])
def test_frozen_parts_get_no_gradient_and_are_not_trainable(tmp_path, arch):
    model, tok = tiny_model(tmp_path, arch)
    loss, _ = covr_loss(model, _batch(tok), LossConfig())
    loss.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    vision = list(model.hf.vision_model.parameters())
    assert vision and all(id(p) not in trainable and p.grad is None for p in vision)
    with_grad = [
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert with_grad and all(id(dict(model.named_parameters())[n]) in trainable for n in with_grad)
    if arch == "blip2":
        assert model.hf.query_tokens.grad is not None
        assert model.hf.text_projection.weight.grad.abs().sum() > 0


def test_unfrozen_vision_is_trained(tmp_path):
    model, tok = tiny_model(tmp_path, "blip2", freeze_vision=False, train_target_encoder=True)
    loss, _ = covr_loss(model, _batch(tok), LossConfig())
    loss.backward()
    assert model.hf.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_loss_with_queue_and_caption_term(tmp_path):
    model, tok = tiny_model(tmp_path, "blip2")
    queue = TargetQueue(6, (1, 16))
    cfg = LossConfig(caption_weight=0.5)
    loss1, m1 = covr_loss(model, _batch(tok, seed=1), cfg, queue)
    assert queue.filled == 4 and "loss_caption" in m1
    loss2, m2 = covr_loss(model, _batch(tok, seed=2), cfg, queue)
    assert queue.filled == 6 and torch.isfinite(loss2)
    loss2.backward()


def test_pool_frames_weights():
    frames = torch.stack([torch.full((2, 3), float(i)) for i in range(3)])[None]  # (1, 3, 2, 3)
    uniform = pool_frames(frames, torch.tensor([[float("nan")] * 3]))
    assert torch.allclose(uniform, torch.full((1, 2, 3), 1.0))
    sharp = pool_frames(frames, torch.tensor([[0.0, 0.0, 5.0]]), temperature=0.1)
    assert torch.allclose(sharp, torch.full((1, 2, 3), 2.0), atol=1e-3)
    masked = pool_frames(frames, None, torch.tensor([[True, False, False]]))
    assert torch.allclose(masked, torch.zeros(1, 2, 3))


def test_similarity_reductions():
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # (1, 2, 2)
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert similarity(q, t, "mean").item() == pytest.approx(0.5)
    assert similarity(q, t, "max").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown reduce"):
        similarity(q, t, "min")


def test_from_scratch_gradients_are_finite(tmp_path):
    model, tok = tiny_model(tmp_path, "blip2")
    model.eval()  # no dropout to break the symmetry of equal query tokens
    model("encode_target_frames", torch.randn(4, 3, 32, 32)).sum().backward()
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and g.abs().max() < 1e4 for g in grads)
