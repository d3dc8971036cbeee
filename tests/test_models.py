import copy

import pytest
import torch

from configs.schema import LossConfig
from eval.similarity import similarity
from sharding.batch import Task
from tests.tiny import tiny_model
from train.models import pool_frames
from train.objective import covr_loss
from train.queue import TargetQueue


def _batch(tok, b=4, fq=1, ft=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tok(
        ["make it red", "replace circle with square", "change it to blue", "make it green"][:b],
        padding="max_length",
        max_length=12,
        truncation=True,
        return_tensors="pt",
    )
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
    composed = model(
        Task.COMPOSE, batch["query_frames"], batch["input_ids"], batch["attention_mask"]
    )
    q, w = composed.query, composed.combiner_weights
    assert q.shape == (4, tokens if combiner == "fusion" else 1, 16)
    assert torch.allclose(q.norm(dim=-1), torch.ones(q.shape[:2]), atol=1e-5)
    assert (w is None) == (combiner != "mlp")
    if w is not None:
        assert w.shape == (4, 3) and torch.allclose(w.sum(1), torch.ones(4))
    t = model(
        Task.ENCODE_TARGET, batch["target_frames"], batch["target_scores"], batch["target_mask"]
    )
    assert t.shape == (4, tokens, 16)
    assert model(Task.ENCODE_TEXT, batch["input_ids"], batch["attention_mask"]).shape == (4, 16)
    with pytest.raises(TypeError, match="must be a sharding.batch.Task"):
        model("encode_text", batch["input_ids"], batch["attention_mask"])  # a bare string


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
    model, tok = tiny_model(tmp_path, "blip2", train_target_encoder=True)  # as the demo
    model.eval()  # no dropout to break the symmetry of equal query tokens
    model(Task.ENCODE_TARGET_FRAMES, torch.randn(4, 3, 32, 32)).sum().backward()
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and g.abs().max() < 1e4 for g in grads)


# --- targets: a frozen copy of the starting weights, unless the target encoder is trained ------


@pytest.mark.parametrize("arch", ["blip2", "blip"])
@pytest.mark.parametrize("freeze_vision", [True, False])
def test_no_gradient_reaches_any_parameter_from_the_target_side(tmp_path, arch, freeze_vision):
    model, tok = tiny_model(tmp_path, arch, freeze_vision=freeze_vision)
    model.eval()  # no dropout: the two backward passes below must see the same forward
    batch = _batch(tok)
    target = model(
        Task.ENCODE_TARGET, batch["target_frames"], batch["target_scores"], batch["target_mask"]
    )
    caption = model(
        Task.ENCODE_CAPTION, batch["caption_input_ids"], batch["caption_attention_mask"]
    )
    assert not target.requires_grad and not caption.requires_grad
    # the whole loss (video + caption terms): gradients only through the query side, so exactly
    # those of the query side alone with the targets given as constants
    loss, _ = covr_loss(model, batch, LossConfig(caption_weight=0.5))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and not any(n.startswith("frozen_target.") for n in grads)
    model.zero_grad()
    q, _ = model(Task.COMPOSE, batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    from train.losses import hn_nce

    c = LossConfig(caption_weight=0.5)
    query = q.float().mean(1)
    alone = c.video_weight * hn_nce(query, target.float().mean(1), c.temperature, c.alpha, c.beta)
    alone = alone + c.caption_weight * hn_nce(
        query, caption.float(), c.temperature, c.alpha, c.beta
    )
    alone.backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n


@pytest.mark.parametrize("arch", ["blip2", "blip"])
def test_targets_stay_those_of_the_starting_model_while_the_query_side_trains(tmp_path, arch):
    model, tok = tiny_model(tmp_path, arch, freeze_vision=False)
    model.eval()
    batch = _batch(tok)
    frames = batch["target_frames"][:, 0]
    before = model(Task.ENCODE_TARGET_FRAMES, frames)
    caption_before = model(
        Task.ENCODE_CAPTION, batch["caption_input_ids"], batch["caption_attention_mask"]
    )
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    loss, _ = covr_loss(model, batch, LossConfig(caption_weight=0.5))
    loss.backward()
    opt.step()
    assert torch.equal(model(Task.ENCODE_TARGET_FRAMES, frames), before)
    assert torch.equal(
        model(Task.ENCODE_CAPTION, batch["caption_input_ids"], batch["caption_attention_mask"]),
        caption_before,
    )
    # the live weights did move: the same head on the live path now gives something else
    live = model.target_head(model._vision(frames))
    assert not torch.allclose(live, before, atol=1e-4)
    model.train()
    assert model.training and not model.frozen_target.training  # no dropout in the targets


def test_a_trained_target_encoder_gets_gradients_from_the_target_side(tmp_path):
    model, tok = tiny_model(tmp_path, "blip2", train_target_encoder=True)
    assert model.frozen_target is None
    batch = _batch(tok)
    model(Task.ENCODE_TARGET, batch["target_frames"]).sum().backward()
    assert model.hf.query_tokens.grad.abs().sum() > 0
    assert model.hf.vision_projection.weight.grad.abs().sum() > 0


def test_export_keeps_the_starting_target_encoder(tmp_path):
    from train.export import export_model, load_exported

    model, tok = tiny_model(tmp_path, "blip2")
    model.eval()
    with torch.no_grad():  # the query side moved away from the starting weights
        for p in model.hf.qformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(tok)
    frames = batch["target_frames"][:, 0]
    export_model(model.state_dict(), model.cfg, tok, tmp_path / "export")
    assert (tmp_path / "export" / "target_encoder.pt").is_file()
    loaded, _ = load_exported(tmp_path / "export")
    loaded.eval()
    assert torch.allclose(
        loaded(Task.ENCODE_TARGET_FRAMES, frames), model(Task.ENCODE_TARGET_FRAMES, frames)
    )
    q = model(Task.ENCODE_QUERY, batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    q2 = loaded(
        Task.ENCODE_QUERY, batch["query_frames"], batch["input_ids"], batch["attention_mask"]
    )
    assert torch.allclose(q, q2, atol=1e-6)


# --- BLIP fidelity --------------------------------------------------------------------------


def test_blip_vit_layer_norms_use_eps_1e6(tmp_path):
    model, tok = tiny_model(tmp_path, "blip")
    norms = [m for m in model.hf.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1  # two per block, the final norm
    assert all(m.eps == 1e-6 for m in norms)
    model.hf.save_pretrained(tmp_path / "blip")  # a pretrained directory saved with eps 1e-5
    cfg = model.cfg
    import json

    config = json.loads((tmp_path / "blip" / "config.json").read_text())
    config["vision_config"]["layer_norm_eps"] = 1e-5
    (tmp_path / "blip" / "config.json").write_text(json.dumps(config))
    from dataclasses import replace

    from train.models import build_model

    loaded = build_model(replace(cfg, pretrained=str(tmp_path / "blip")), tok)
    assert all(
        m.eps == 1e-6 for m in loaded.hf.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)
    )


def test_vit_stochastic_depth_drops_whole_samples_in_train_mode_only(tmp_path):
    torch.manual_seed(0)
    plain, _ = tiny_model(tmp_path, "blip")
    torch.manual_seed(0)
    model, _ = tiny_model(tmp_path, "blip", vision_drop_path=0.5)  # 2 blocks: rates 0 and 0.5
    assert plain.state_dict().keys() == model.state_dict().keys()  # checkpoints unchanged
    first, last = model.hf.vision_model.encoder.layers
    assert not first.mlp._forward_hooks and len(last.mlp._forward_hooks) == 1
    seen = {}
    last.mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    pixels = torch.randn(64, 3, 32, 32)
    model.train()  # the ViT is frozen, yet in train mode as in the reference
    model._vision(pixels)
    raw = last.mlp.forward(seen["x"])  # .forward: the branch without its hooks
    dropped = (seen["y"] == 0).flatten(1).all(1)
    kept = torch.isclose(seen["y"], 2 * raw, atol=1e-6).flatten(1).all(1)  # scaled by 1 / 0.5
    assert (dropped ^ kept).all()  # each sample whole: dropped or kept
    assert 16 <= int(dropped.sum()) <= 48  # about half of 64
    plain.eval()  # the target path (sharing the frozen ViT) still encodes in eval mode
    target = model(Task.ENCODE_TARGET_FRAMES, pixels)
    assert torch.equal(target, plain(Task.ENCODE_TARGET_FRAMES, pixels)) and model.training
    model.eval()
    plain.eval()
    assert torch.equal(model._vision(pixels), plain._vision(pixels))  # eval: no stochastic depth


def test_blip_pooled_target_is_normalised_again(tmp_path):
    model, tok = tiny_model(tmp_path, "blip")
    batch = _batch(tok)
    t = model(
        Task.ENCODE_TARGET, batch["target_frames"], batch["target_scores"], batch["target_mask"]
    )
    assert torch.allclose(t.norm(dim=-1), torch.ones(4, 1), atol=1e-5)
    frames = model(Task.ENCODE_TARGET_FRAMES, batch["target_frames"].flatten(0, 1)).view(
        4, 3, 1, -1
    )
    pooled = pool_frames(frames, batch["target_scores"], batch["target_mask"])
    assert (pooled.norm(dim=-1) < 0.999).any()  # averaging unit vectors shrinks them
    assert torch.allclose(t, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-6)


def test_blip_query_starts_with_enc_and_the_tokenizer_gives_the_reference_ids(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import TOKEN_ROLES, load_tokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "make", "it", "red"]
    core = Tokenizer(WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    bare = PreTrainedTokenizerFast(tokenizer_object=core, **TOKEN_ROLES)  # no [ENC] / [DEC]
    bare.save_pretrained(tmp_path / "bert")
    tok = load_tokenizer(tmp_path / "bert")  # a bare BERT vocabulary, as bert-base-uncased
    assert tok.convert_tokens_to_ids("[DEC]") == len(words)  # 30522 for bert-base-uncased
    assert tok.convert_tokens_to_ids("[ENC]") == len(words) + 1  # 30523
    model, tok = tiny_model(tmp_path, "blip")
    seen = []
    model.hf.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    batch = _batch(tok)
    model(Task.ENCODE_QUERY, batch["query_frames"], batch["input_ids"], batch["attention_mask"])
    assert (seen[0][:, 0] == tok.convert_tokens_to_ids("[ENC]")).all()
    assert torch.equal(seen[0][:, 1:], batch["input_ids"][:, 1:])


# --- starting weights ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["blip2", "blip"])
def test_a_size_that_disagrees_with_the_pretrained_weights_is_an_error(tmp_path, arch):
    from dataclasses import replace

    from configs.schema import ConfigError
    from train.models import build_model

    model, tok = tiny_model(tmp_path, arch)
    model.hf.save_pretrained(tmp_path / "weights")
    cfg = replace(model.cfg, pretrained=str(tmp_path / "weights"))
    build_model(cfg, tok)  # the same sizes: fine
    wrong = replace(cfg, vision=replace(cfg.vision, image_size=64))
    with pytest.raises(ConfigError, match="model.vision.image_size=64 but the weights have 32"):
        build_model(wrong, tok)
    wrong = replace(cfg, text=replace(cfg.text, layers=3), embed_dim=8)
    with pytest.raises(
        ConfigError, match="model.text.layers=3 but the weights have 2.*model.embed_dim=8"
    ):
        build_model(wrong, tok)


def test_a_covr_checkpoint_on_pretrained_weights_keeps_the_starting_target_path(tmp_path):
    from dataclasses import replace

    from train.lavis import hf_to_lavis
    from train.models import build_model

    start, tok = tiny_model(tmp_path, "blip2")
    start.hf.save_pretrained(tmp_path / "start")
    trained = copy.deepcopy(start)  # trained: the query side moved, the frozen parts did not
    with torch.no_grad():
        for p in [*trained.hf.qformer.parameters(), trained.hf.query_tokens]:
            p.add_(0.05 * torch.randn_like(p))
    state = hf_to_lavis(trained.hf.state_dict(), "blip2")
    torch.save({"model": state}, tmp_path / "covr.pth")
    cfg = replace(
        start.cfg, pretrained=str(tmp_path / "start"), lavis_checkpoint=str(tmp_path / "covr.pth")
    )
    model = build_model(cfg, tok).eval()
    start.eval(), trained.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(
        model(Task.ENCODE_TARGET_FRAMES, x), start(Task.ENCODE_TARGET_FRAMES, x), atol=1e-6
    )
    assert torch.equal(model.hf.qformer.layernorm.weight, trained.hf.qformer.layernorm.weight)
