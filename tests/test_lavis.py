import pytest
import torch

from sharding.batch import Task
from tests.tiny import tiny_model
from train.lavis import CheckpointMappingError, hf_to_lavis, lavis_to_hf, load_lavis_checkpoint


@pytest.mark.parametrize("arch", ["blip2", "blip"])
def test_mapping_round_trips_a_state_dict(tmp_path, arch):
    model, _ = tiny_model(tmp_path, arch)
    state = model.hf.state_dict()
    _zero_k_bias(state)
    lavis = hf_to_lavis(state, arch)
    if arch == "blip2":
        assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in lavis
        assert "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight" in lavis
        assert "ln_vision.weight" in lavis and "visual_encoder.blocks.0.attn.q_bias" in lavis
    else:
        assert "visual_encoder.norm.weight" in lavis
    back, unmapped = lavis_to_hf(lavis, arch)
    assert unmapped == [] and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def _zero_k_bias(state):
    """LAVIS's EVA ViT has no k bias: zero it so the state is representable there."""
    for name, t in state.items():
        if name.endswith("self_attn.qkv.bias"):
            t[t.numel() // 3 : 2 * t.numel() // 3] = 0


@pytest.mark.parametrize("arch", ["blip2", "blip"])
def test_loading_a_lavis_checkpoint_reproduces_the_model(tmp_path, arch):
    source, _ = tiny_model(tmp_path, arch)
    _zero_k_bias(source.hf.state_dict())
    lavis = hf_to_lavis(source.hf.state_dict(), arch)
    lavis["temp"] = torch.tensor(0.07)  # ignored names
    lavis["Qformer.cls.predictions.bias"] = torch.zeros(3)
    torch.save({"model": lavis}, tmp_path / "covr.pth")
    torch.manual_seed(123)  # other initial weights, replaced by the checkpoint's
    target, _ = tiny_model(tmp_path, arch, lavis_checkpoint=str(tmp_path / "covr.pth"))
    source.eval(), target.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(
        source(Task.ENCODE_TARGET_FRAMES, x), target(Task.ENCODE_TARGET_FRAMES, x), atol=1e-6
    )


def test_lightning_checkpoint_and_clear_errors(tmp_path):
    model, _ = tiny_model(tmp_path, "blip2")
    lavis = hf_to_lavis(model.hf.state_dict(), "blip2")
    bad = {f"model.{k}": v for k, v in lavis.items()}
    bad["model.vision_proj.weight"] = torch.zeros(3, 3)  # wrong shape
    bad["model.some_new_head.weight"] = torch.zeros(1)  # unmapped
    del bad["model.text_proj.bias"]  # missing
    torch.save({"state_dict": bad}, tmp_path / "covr.ckpt")
    with pytest.raises(CheckpointMappingError) as err:
        load_lavis_checkpoint(model.hf, tmp_path / "covr.ckpt", "blip2")
    msg = str(err.value)
    assert "unmapped (1): some_new_head.weight" in msg
    assert "missing (1): text_projection.bias" in msg
    assert "vision_projection.weight: checkpoint (3, 3)" in msg


# --- checkpoints holding exactly the reference models' keys ---------------------------------
# Written from the reference's module definitions (lucas-ventura/CoVR: src/model/blip2/blip2_cir.py
# BLIP2Cir over LAVIS's EVA ViT and src/model/blip2/Qformer.py; src/model/blip/blip_cir.py BLIPCir
# over src/model/blip/vit.py and med.py), independently of train.lavis's mapping table. Neither
# model has an ITM head; `temp` is a float attribute, not saved.


def _vit_keys(v, *, eva: bool) -> dict:
    c, n = v.hidden_size, (v.image_size // v.patch_size) ** 2 + 1
    keys = {
        "visual_encoder.cls_token": (1, 1, c),
        "visual_encoder.pos_embed": (1, n, c),
        "visual_encoder.patch_embed.proj.weight": (c, 3, v.patch_size, v.patch_size),
        "visual_encoder.patch_embed.proj.bias": (c,),
    }
    for i in range(v.layers):
        b = f"visual_encoder.blocks.{i}."
        keys |= {
            b + "attn.qkv.weight": (3 * c, c),
            b + "attn.proj.weight": (c, c),
            b + "mlp.fc1.weight": (v.intermediate_size, c),
            b + "mlp.fc1.bias": (v.intermediate_size,),
            b + "mlp.fc2.weight": (c, v.intermediate_size),
        }
        for name in (
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
            "attn.proj.bias",
            "mlp.fc2.bias",
        ):
            keys[b + name] = (c,)
        if eva:  # LAVIS EVA ViT: q and v biases, no k bias
            keys |= {b + "attn.q_bias": (c,), b + "attn.v_bias": (c,)}
        else:
            keys[b + "attn.qkv.bias"] = (3 * c,)
    if not eva:
        keys |= {"visual_encoder.norm.weight": (c,), "visual_encoder.norm.bias": (c,)}
    return keys


def _bert_keys(
    prefix: str, t, vocab: int, vision_width: int, cross_every: int, query_ffn: bool
) -> dict:
    h, i = t.hidden_size, t.intermediate_size
    keys = {
        f"{prefix}embeddings.word_embeddings.weight": (vocab, h),
        f"{prefix}embeddings.position_embeddings.weight": (t.max_position_embeddings, h),
        f"{prefix}embeddings.LayerNorm.weight": (h,),
        f"{prefix}embeddings.LayerNorm.bias": (h,),
        f"{prefix}embeddings.position_ids": (1, t.max_position_embeddings),
    }

    def attention(b, kv_width):
        return {
            b + "self.query.weight": (h, h),
            b + "self.query.bias": (h,),
            b + "self.key.weight": (h, kv_width),
            b + "self.key.bias": (h,),
            b + "self.value.weight": (h, kv_width),
            b + "self.value.bias": (h,),
            b + "output.dense.weight": (h, h),
            b + "output.dense.bias": (h,),
            b + "output.LayerNorm.weight": (h,),
            b + "output.LayerNorm.bias": (h,),
        }

    def ffn(inter, out):
        return {
            inter + "dense.weight": (i, h),
            inter + "dense.bias": (i,),
            out + "dense.weight": (h, i),
            out + "dense.bias": (h,),
            out + "LayerNorm.weight": (h,),
            out + "LayerNorm.bias": (h,),
        }

    for layer in range(t.layers):
        b = f"{prefix}encoder.layer.{layer}."
        keys |= attention(b + "attention.", h) | ffn(b + "intermediate.", b + "output.")
        if layer % cross_every == 0:
            keys |= attention(b + "crossattention.", vision_width)
        if query_ffn:
            keys |= ffn(b + "intermediate_query.", b + "output_query.")
    return keys


def reference_keys(cfg, vocab: int) -> dict:
    """name -> shape of the reference CoVR model's state dict (tiny sizes)."""
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    if cfg.arch == "blip2":
        h = t.hidden_size
        keys = _vit_keys(v, eva=True) | _bert_keys(
            "Qformer.bert.", t, vocab, v.hidden_size, t.cross_attention_frequency, query_ffn=True
        )
        keys |= {
            "ln_vision.weight": (v.hidden_size,),
            "ln_vision.bias": (v.hidden_size,),
            "query_tokens": (1, cfg.num_query_tokens, h),
            "Qformer.cls.predictions.bias": (vocab,),
            "Qformer.cls.predictions.decoder.weight": (vocab, h),
            "Qformer.cls.predictions.decoder.bias": (vocab,),
            "Qformer.cls.predictions.transform.dense.weight": (h, h),
            "Qformer.cls.predictions.transform.dense.bias": (h,),
            "Qformer.cls.predictions.transform.LayerNorm.weight": (h,),
            "Qformer.cls.predictions.transform.LayerNorm.bias": (h,),
            "vision_proj.weight": (e, h),
            "vision_proj.bias": (e,),
            "text_proj.weight": (e, h),
            "text_proj.bias": (e,),
        }
        return keys
    keys = _vit_keys(v, eva=False) | _bert_keys(
        "text_encoder.", t, vocab, v.hidden_size, 1, query_ffn=False
    )
    return keys | {
        "vision_proj.weight": (e, v.hidden_size),
        "vision_proj.bias": (e,),
        "text_proj.weight": (e, t.hidden_size),
        "text_proj.bias": (e,),
    }


class NotAllowlisted:
    """Stands for the classes real checkpoints pickle (the reference's CosineSchedule, Lightning
    hyper-parameters containers, argparse.Namespace): not on any allowlist."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _reference_state(cfg, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in reference_keys(cfg, vocab).items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[1])[None]
        else:
            state[name] = torch.randn(shape, generator=g) * 0.02
    return state


def _write(layout, state, path):
    if layout == "pth":  # LAVIS: model + plain config dict
        torch.save({"model": state, "config": {"arch": "covr"}, "epoch": 4}, path)
    elif (
        layout == "fabric"
    ):  # CoVR train.py: fabric.save({"epoch", "model", "optimizer", "scheduler"})
        sched = NotAllowlisted(min_lr=0, init_lr=2e-5, max_epochs=5)
        torch.save(
            {
                "epoch": 4,
                "model": state,
                "optimizer": {"state": {}, "param_groups": []},
                "scheduler": sched,
            },
            path,
        )
    else:  # Lightning: state_dict with the module prefix, hyper-parameters of some class
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in state.items()},
                "epoch": 4,
                "global_step": 100,
                "pytorch-lightning_version": "2.0.0",
                "hyper_parameters": NotAllowlisted(lr=2e-5, loss="hn_nce"),
            },
            path,
        )


@pytest.mark.parametrize("arch", ["blip2", "blip"])
@pytest.mark.parametrize("layout", ["pth", "fabric", "lightning"])
def test_reference_covr_checkpoints_load(tmp_path, arch, layout, caplog):
    from data.tokenizer import build_vocab_tokenizer
    from tests.tiny import tiny_model_config
    from train.models import build_model

    cfg = tiny_model_config(arch)
    cfg.text.cross_attention_frequency = 2  # layer 1 of the Q-Former has no cross-attention
    tok = build_vocab_tokenizer(["a red circle"], tmp_path / "tok")
    model = build_model(cfg, tok)
    itm_before = model.hf.itm_head.weight.clone()
    state = _reference_state(cfg, len(tok))
    path = tmp_path / f"covr.{'pth' if layout == 'pth' else 'ckpt'}"
    _write(layout, state, path)
    with caplog.at_level("INFO", logger="train.lavis"):
        load_lavis_checkpoint(model.hf, path, arch)
    assert "itm_head.weight" in caplog.text and "initial values" in caplog.text
    assert torch.equal(model.hf.itm_head.weight, itm_before)
    # every tensor the reference model holds landed, by value, where the mapping says
    expected, unmapped = lavis_to_hf(state, arch)
    assert unmapped == []
    own = model.hf.state_dict()
    assert set(own) - set(expected) == {"itm_head.weight", "itm_head.bias"}
    assert all(torch.equal(own[k], v) for k, v in expected.items())
    proj = "text_projection" if arch == "blip2" else "text_proj"
    assert torch.equal(own[f"{proj}.weight"], state["text_proj.weight"])


@pytest.mark.parametrize("arch", ["blip2", "blip"])
def test_a_missing_used_parameter_is_still_an_error(tmp_path, arch):
    from data.tokenizer import build_vocab_tokenizer
    from tests.tiny import tiny_model_config
    from train.models import build_model

    cfg = tiny_model_config(arch)
    tok = build_vocab_tokenizer(["a red circle"], tmp_path / "tok")
    model = build_model(cfg, tok)
    state = _reference_state(cfg, len(tok))
    gone = (
        "Qformer.bert.encoder.layer.1.output_query.dense.weight"
        if arch == "blip2"
        else "vision_proj.bias"
    )
    del state[gone]
    torch.save({"model": state}, tmp_path / "covr.pth")
    with pytest.raises(
        CheckpointMappingError,
        match="missing \\(1\\): .*(output_query.dense.weight|vision_proj.bias)",
    ):
        load_lavis_checkpoint(model.hf, tmp_path / "covr.pth", arch)


# --- loading never executes code from the file ------------------------------------------------


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_crafted_checkpoint_loads_its_tensors_and_runs_nothing(tmp_path):
    import pickle

    from train.lavis import read_checkpoint

    marker = tmp_path / "marker"
    weights = {"text_proj.weight": torch.ones(2, 2)}
    # control: the payload does write the marker when unpickled the unsafe way
    pickle.loads(pickle.dumps(_WritesMarker(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    torch.save({"model": weights, "payload": _WritesMarker(marker)}, tmp_path / "evil.pth")
    state = read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    assert state.keys() == {"text_proj.weight"} and torch.equal(
        state["text_proj.weight"], weights["text_proj.weight"]
    )
    # the payload inside the state dict itself: dropped, still not run
    torch.save({"model": {**weights, "bad": _WritesMarker(marker)}}, tmp_path / "evil2.pth")
    assert read_checkpoint(tmp_path / "evil2.pth").keys() == {"text_proj.weight"}
    assert not marker.exists()
    # legacy (non-zip) serialisation goes through the same restricted unpickler
    torch.save(
        {"model": weights, "payload": _WritesMarker(marker)},
        tmp_path / "evil3.pth",
        _use_new_zipfile_serialization=False,
    )
    assert read_checkpoint(tmp_path / "evil3.pth").keys() == {"text_proj.weight"}
    assert not marker.exists()


def test_an_unreadable_checkpoint_names_the_file(tmp_path):
    from train.lavis import read_checkpoint

    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointMappingError, match="broken.pth"):
        read_checkpoint(tmp_path / "broken.pth")
