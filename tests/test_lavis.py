import pytest
import torch

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
    torch.manual_seed(123)
    target, _ = tiny_model(tmp_path, arch)
    load_lavis_checkpoint(target.hf, tmp_path / "covr.pth", arch)
    source.eval(), target.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(
        source("encode_target_frames", x), target("encode_target_frames", x), atol=1e-6
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
