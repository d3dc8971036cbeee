"""Tiny random configurations of the real model classes, shared by the tests."""

from pathlib import Path

from omegaconf import OmegaConf

from configs.schema import CONFIG_DIR, ModelConfig, TextSize, VisionSize
from data.tokenizer import build_vocab_tokenizer
from train.models import build_model

WORDS = "a red blue green circle square moving left right make it replace with change to"


def tiny_model_config(arch: str = "blip2", **overrides) -> ModelConfig:
    cfg = ModelConfig(
        arch=arch,
        vision=VisionSize(
            hidden_size=32, layers=2, heads=2, intermediate_size=64, image_size=32, patch_size=8
        ),
        text=TextSize(
            hidden_size=32,
            layers=2,
            heads=2,
            intermediate_size=64,
            cross_attention_frequency=1,
            max_position_embeddings=64,
        ),
        num_query_tokens=4,
        embed_dim=16,
        max_text_len=12,
    )
    for key, value in overrides.items():  # model-level fields only
        setattr(cfg, key, value)
    return cfg


def tiny_model(tmp_path, arch="blip2", **overrides):
    tok = build_vocab_tokenizer([WORDS], tmp_path / "tok")
    return build_model(tiny_model_config(arch, **overrides), tok), tok


def write_tiny_config(path: Path, shards: Path, tokenizer: Path, *overrides: str) -> Path:
    """configs/tiny.yaml with these shards, tokenizer and `key=value` overrides, as one file."""
    dotlist = [f"shards.dir={shards}", f"model.tokenizer={tokenizer}", *overrides]
    merged = OmegaConf.merge(
        OmegaConf.load(CONFIG_DIR / "tiny.yaml"), OmegaConf.from_dotlist(dotlist)
    )
    OmegaConf.save(merged, path)
    return path
