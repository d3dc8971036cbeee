"""The gradient cache (`train.chunk_size`) gives the gradients of the batch in one piece, on the
real model, with the queue, the momentum encoder, the caption term and dropout; `model.dropout`."""

import pytest
import torch

from configs.schema import LossConfig
from sharding.batch import Task
from tests.tiny import tiny_model
from train.gradcache import chunked_backward
from train.models import build_model
from train.objective import COVR, ITC
from train.queue import MomentumEncoder, TargetQueue


class Engine:
    """What `chunked_backward` uses of a DeepSpeed engine, around a plain module."""

    def __init__(self, module):
        self.module, self.device, self.boundaries = module, torch.device("cpu"), []
        self.tasks = []  # the model calls made through the engine

    def __call__(self, *args):
        self.tasks.append(args[0])
        return self.module(*args)

    @property
    def cfg(self):
        return self.module.cfg

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.boundaries.append(is_boundary)

    def backward(self, loss):
        loss.backward()


def _batch(tok, b=7, frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tok(
        ["replace circle with square", "make it red"] * b,
        padding="max_length",
        max_length=12,
        return_tensors="pt",
    )
    return {
        "query_frames": torch.randn(b, 1, 3, 32, 32, generator=g),
        "input_ids": enc.input_ids[:b],
        "attention_mask": enc.attention_mask[:b],
        "target_frames": torch.randn(b, frames, 3, 32, 32, generator=g),
        "target_scores": torch.rand(b, frames, generator=g),
        "target_mask": torch.ones(b, frames, dtype=torch.bool),
        "target_ids": torch.arange(b) + 100 * seed,
        "caption_input_ids": enc.input_ids[b:],
        "caption_attention_mask": enc.attention_mask[b:],
    }


def _setup(tmp_path, reduce="mean", dropout=0.0, combiner="fusion"):
    torch.manual_seed(0)
    model, tok = tiny_model(
        tmp_path, reduce=reduce, dropout=dropout, combiner=combiner, train_target_encoder=True
    )
    tokens = 1 if reduce == "mean" else model.cfg.num_query_tokens
    queue = TargetQueue(10, (tokens, model.cfg.embed_dim))
    momentum = MomentumEncoder(model, 0.9)
    return model, tok, queue, momentum


@pytest.fixture
def float64():
    """Exact comparisons: in fp32 the chunks' kernels round differently from the whole batch's
    (about 1e-4 relative on gradients that are sums of cancelling terms); in fp64 the two agree
    to 1e-12. The fp32 equality through the real launcher is tests/test_gradcache_e2e.py."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("reduce", "combiner"), [("mean", "fusion"), ("max", "mlp")])
def test_chunks_give_the_whole_batch_gradients(tmp_path, reduce, combiner, float64):
    """Dropout 0: chunks of 3, 3, 1 against the batch of 7 in one piece, two steps each (the
    second one with a filled queue), the caption term and momentum-encoded queue entries."""
    cfg = LossConfig(caption_weight=0.5)
    runs = []
    for chunk in (0, 3):
        model, tok, queue, momentum = _setup(tmp_path, reduce, combiner=combiner)
        engine, losses = Engine(model), []
        for step in range(2):
            model.zero_grad()
            batch = _batch(tok, seed=step)
            if chunk:
                loss, metrics = chunked_backward(engine, batch, COVR, cfg, chunk, queue, momentum)
            else:
                loss, metrics = COVR.loss(model, batch, cfg, queue, momentum)
                loss.backward()
            losses.append(loss.detach())
        runs.append((_grads(model), losses, queue.state_dict(), metrics, engine.boundaries))
    (whole, whole_loss, whole_queue, whole_m, _), (chunked, loss, queued, m, boundaries) = runs
    assert boundaries == [False, False, None] * 2  # only the last chunk may end the step
    assert whole.keys() == chunked.keys() and "hf.vision_projection.weight" in whole
    for name in whole:
        assert torch.allclose(whole[name], chunked[name], atol=1e-10, rtol=1e-8), name
    assert torch.allclose(torch.stack(whole_loss), torch.stack(loss), atol=1e-6)
    assert torch.allclose(whole_queue["features"], queued["features"], atol=1e-6)
    assert torch.equal(whole_queue["ids"], queued["ids"]) and queued["filled"] == 10
    assert set(whole_m) == set(m) and torch.allclose(whole_m["loss_caption"], m["loss_caption"])


def test_chunked_loss_reads_the_queue(tmp_path):
    """A filled queue adds negatives to the chunked loss (the gradient cache hands the queue to
    the contrast, not only to the embedding pass), the same as the whole batch's loss."""
    cfg = LossConfig()
    model, tok, queue, _ = _setup(tmp_path)
    batch = _batch(tok, seed=0)
    entries = torch.nn.functional.normalize(torch.randn(10, 1, 16), dim=-1)
    queue.enqueue(entries, torch.arange(100, 110))
    same = TargetQueue(10, (1, 16))
    same.enqueue(entries, torch.arange(100, 110))
    plain, _ = chunked_backward(Engine(model), batch, COVR, cfg, 3)
    model.zero_grad()
    queued, _ = chunked_backward(Engine(model), batch, COVR, cfg, 3, queue)
    whole, _ = COVR.loss(model, batch, cfg, same)
    assert queued > plain + 1e-3
    assert torch.allclose(queued, whole.detach(), atol=1e-5)


def test_dropout_masks_are_replayed(tmp_path, float64):
    """Dropout 0.3: the gradient equals that of embedding the chunks one after another with
    their graphs (the same random stream), which only holds if the second pass replays the
    first pass's masks; the RNG continues after the step as if the chunks were embedded once."""
    cfg, chunk = LossConfig(), 3
    model, tok, _, _ = _setup(tmp_path, dropout=0.3)
    batch = _batch(tok)
    torch.manual_seed(5)
    parts = [
        COVR.embed(model, {k: v[i : i + chunk] for k, v in batch.items()}, cfg)
        for i in range(0, 7, chunk)
    ]
    after = torch.get_rng_state()
    emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    COVR.contrast(emb, batch["target_ids"], cfg, "mean")[0].backward()
    reference = _grads(model)

    model.zero_grad()
    torch.manual_seed(5)
    chunked_backward(Engine(model), batch, COVR, cfg, chunk)
    assert torch.equal(torch.get_rng_state(), after)
    chunked = _grads(model)
    for name in reference:
        assert torch.allclose(reference[name], chunked[name], atol=1e-10, rtol=1e-8), name
    # and the masks matter: another draw gives other gradients
    model.zero_grad()
    chunked_backward(Engine(model), batch, COVR, cfg, chunk)
    name = "hf.query_tokens"
    assert not torch.allclose(reference[name], _grads(model)[name], atol=1e-4)


def test_itc_objective_in_chunks(tmp_path, float64):
    model, tok, _, _ = _setup(tmp_path)
    batch, cfg = _batch(tok), LossConfig()
    ITC.loss(model, batch, cfg)[0].backward()
    whole = _grads(model)
    model.zero_grad()
    chunked_backward(Engine(model), batch, ITC, cfg, 2)
    for name, g in _grads(model).items():
        assert torch.allclose(whole[name], g, atol=1e-10, rtol=1e-8), name


@pytest.mark.parametrize("arch", ["blip2", "blip"])
def test_model_dropout_setting(tmp_path, arch):
    model, tok = tiny_model(tmp_path, arch, dropout=0.25)
    text = model.hf.qformer if arch == "blip2" else model.hf.text_encoder
    ps = {m.p for m in text.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.25}
    if arch == "blip2":  # BLIP-2's attention keeps its dropout as a float
        assert {m.attention_dropout for m in text.modules() if hasattr(m, "attention_dropout")} == {
            0.25
        }
    # loaded weights get the configured dropout too (not the saved config's)
    model.hf.save_pretrained(tmp_path / "saved")
    off = build_model(
        model.cfg.__class__(
            **{**vars(model.cfg), "pretrained": str(tmp_path / "saved"), "dropout": 0.0}
        ),
        tok,
    )
    assert not any(m.p for m in off.modules() if isinstance(m, torch.nn.Dropout))
    batch = _batch(tok, 3)
    off.train()
    a = off(Task.ENCODE_QUERY, batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    b = off(Task.ENCODE_QUERY, batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)  # dropout 0: training-mode forwards are deterministic
    model.train()
    a = model(Task.ENCODE_QUERY, batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    b = model(Task.ENCODE_QUERY, batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    assert not torch.equal(a, b)


def test_frozen_targets_are_encoded_once(tmp_path, float64):
    """train_target_encoder=false: targets and captions come from the frozen starting copy, so
    the second pass re-encodes only the query side (after its first chunk finds that out)."""
    torch.manual_seed(0)
    model, tok = tiny_model(tmp_path, dropout=0.0)
    batch, cfg = _batch(tok), LossConfig(caption_weight=0.5)
    COVR.loss(model, batch, cfg)[0].backward()
    whole = _grads(model)
    model.zero_grad()
    engine = Engine(model)
    chunked_backward(engine, batch, COVR, cfg, 3)
    tasks = engine.tasks
    assert tasks.count(Task.ENCODE_TARGET) == 3 + 1 and tasks.count(Task.ENCODE_CAPTION) == 3 + 1
    assert tasks.count(Task.COMPOSE) == 3 + 3
    chunked = _grads(model)
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.allclose(whole[name], chunked[name], atol=1e-10, rtol=1e-8), name


def test_a_resumed_run_may_change_the_chunk_size_not_the_dropout():
    from train.resume import is_free

    assert is_free("train.chunk_size") and not is_free("model.dropout")
