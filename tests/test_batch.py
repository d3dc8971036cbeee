import random

import numpy as np
import pytest
import torch

from sharding.batch import augment, collate
from tests.tiny import tiny_model


def test_collate_pads_frames_and_falls_back_to_uniform_scores(tmp_path):
    _, tok = tiny_model(tmp_path)
    frame = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    samples = [
        {
            "query_frames": frame,
            "target_frames": np.zeros((frames, 16, 16, 3), np.uint8),
            "edit": f"make it {colour}",
            "scores": [0.1, 0.2, 0.3],
            "target_id": target,
            "caption": f"a {colour} circle",
        }
        for frames, colour, target in ((3, "red", 4), (2, "blue", 9))
    ]
    batch = collate(samples, tok, image_size=32, max_text_len=8)
    assert batch["query_frames"].shape == (2, 1, 3, 32, 32)
    assert batch["target_frames"].shape == (2, 3, 3, 32, 32)
    assert batch["target_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert torch.allclose(batch["target_scores"][0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.isnan(batch["target_scores"][1]).all()  # 3 scores for 2 frames: uniform
    assert batch["target_ids"].tolist() == [4, 9] and batch["input_ids"].shape == (2, 8)
    assert batch["caption_input_ids"].shape == (2, 8)


def test_covr2_target_captions_keep_50_words_untruncated(tmp_path):
    from configs.schema import ModelConfig

    _, tok = tiny_model(tmp_path)
    vocab = "a red blue green circle square moving left right".split()  # one token each
    words = [vocab[i % len(vocab)] for i in range(60)]
    sample = {
        "query_frames": np.zeros((1, 8, 8, 3), np.uint8),
        "target_frames": np.zeros((1, 8, 8, 3), np.uint8),
        "edit": "make it red",
        "scores": [],
        "target_id": 0,
        "caption": " ".join(words),
    }

    def caption_of(cfg):
        batch = collate([sample], tok, 8, 32, caption=cfg.caption_tokenization())
        ids = batch["caption_input_ids"][0][batch["caption_attention_mask"][0].bool()]
        return batch["caption_input_ids"].shape[1], tok.decode(ids, skip_special_tokens=True)

    length, text = caption_of(ModelConfig(caption_words=50, caption_tokens=0))  # CoVR-2's way
    assert text == " ".join(words[:50]) and length == 52  # every word of 50, [CLS] and [SEP]
    length, text = caption_of(ModelConfig())  # 30 words cut to 32 tokens with [CLS] and [SEP]
    assert length == 32 and text == " ".join(words[:30])
    from configs.schema import Config, ConfigError, validate

    with pytest.raises(ConfigError, match="model.caption_tokens.*512 position embeddings"):
        validate(Config(model=ModelConfig(caption_tokens=600)))


def test_long_edits_keep_the_words_and_tokens_the_recipe_sets(tmp_path):
    """Dense-WebVid-CoVR's edits are about 31 words: the reference's 30-word cleaning and 32
    tokens cut them; model.edit_words and model.max_text_len are the recipe's to set."""
    from configs.schema import Config, ConfigError, ModelConfig, validate

    _, tok = tiny_model(tmp_path)
    vocab = "a red blue green circle square moving left right".split()  # one token each
    words = [vocab[i % len(vocab)] for i in range(45)]
    sample = {
        "query_frames": np.zeros((1, 8, 8, 3), np.uint8),
        "target_frames": np.zeros((1, 8, 8, 3), np.uint8),
        "edit": " ".join(words),
        "scores": [],
        "target_id": 0,
    }

    def edit_of(**kw):
        batch = collate([sample], tok, 8, padding="longest", **kw)
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
        return tok.decode(ids, skip_special_tokens=True)

    assert edit_of(max_text_len=64) == " ".join(words[:30])  # the reference's cleaning
    assert edit_of(max_text_len=32, edit_words=60) == " ".join(words[:30])  # 32 tokens
    assert edit_of(max_text_len=64, edit_words=60) == " ".join(words)  # the whole edit
    for bad, key in ((ModelConfig(edit_words=0), "model.edit_words"),):
        with pytest.raises(ConfigError, match=key):
            validate(Config(model=bad))
    with pytest.raises(ConfigError, match="model.max_text_len.*512 position embeddings"):
        validate(Config(model=ModelConfig(max_text_len=600)))


def _marked_batch(b=16, ft=3, size=16):
    """Each sample's query and target frames: one bright pixel at a per-sample place on zeros."""
    q = torch.zeros(b, 1, 3, size, size)
    for i in range(b):
        q[i, 0, :, 3 + i % 5, 4 + i % 7] = 1.0
    return {"query_frames": q, "target_frames": q.expand(b, ft, 3, size, size).clone()}


def _where(img):  # (3, H, W) -> (row, col) of the marker
    r, c = np.unravel_index(int(img[0].argmax()), img.shape[-2:])
    return int(r), int(c)


def test_augment_moves_query_and_target_together():
    before = _marked_batch()
    batch = augment(_marked_batch(), random.Random(0), hflip=0.5, shift=2)
    moved, flipped = 0, 0
    for i in range(16):
        q = batch["query_frames"][i, 0]
        for f in range(3):  # the target moved exactly as its query did
            assert torch.equal(batch["target_frames"][i, f], q)
        (r0, c0), (r, c) = _where(before["query_frames"][i, 0]), _where(q)
        mirrored = 15 - c0
        assert abs(r - r0) <= 2 and (abs(c - c0) <= 2 or abs(c - mirrored) <= 2)
        moved += (r, c) != (r0, c0)
        flipped += abs(c - mirrored) < abs(c - c0)
    assert moved >= 10 and 3 <= flipped <= 13  # samples differ: per-sample draws


def test_augment_flip_only_and_off():
    before = _marked_batch()
    flipped = augment(_marked_batch(), random.Random(0), hflip=1.0)
    assert torch.equal(flipped["query_frames"], before["query_frames"].flip(-1))
    assert torch.equal(flipped["target_frames"], before["target_frames"].flip(-1))
    same = augment(_marked_batch(), random.Random(0))
    assert torch.equal(same["query_frames"], before["query_frames"])


def test_augment_shift_replicates_the_border():
    img = torch.arange(16.0).view(4, 4)
    idx = torch.arange(4)
    candidates = {  # img moved right by dx, down by dy, edge rows/columns repeated
        (dx, dy): img[(idx - dy).clamp(0, 3)][:, (idx - dx).clamp(0, 3)]
        for dx in (-1, 0, 1)
        for dy in (-1, 0, 1)
    }
    seen = set()
    for seed in range(12):
        x = img.expand(1, 1, 3, 4, 4).clone()
        batch = augment(
            {"query_frames": x, "target_frames": x.clone()}, random.Random(seed), shift=1
        )
        out = batch["query_frames"][0, 0, 0]
        match = [d for d, c in candidates.items() if torch.equal(out, c)]
        assert match, f"seed {seed}: not a translation by <= 1 pixel:\n{out}"
        seen.add(match[0])
    assert len(seen) >= 4  # several different shifts were drawn


def test_augment_refuses_packed_embeddings():
    batch = {
        "query_frames": torch.zeros(2, 1, 3, 4, 4),
        "target_embeddings": torch.zeros(2, 3, 8, 16),
    }
    with pytest.raises(ValueError, match="augment.hflip"):
        augment(batch, random.Random(0), hflip=0.5)


@pytest.mark.parametrize("key", ["target_frames", "target_embeddings"])
def test_augment_keeps_a_random_ordered_subset_of_each_targets_valid_frames(key):
    shape = (4, 3, 2, 2) if key == "target_frames" else (4, 2)  # per frame
    frame_no = torch.arange(3 * 4.0).view(3, 4, *[1] * len(shape[1:]))  # value = b * 4 + f
    batch = {
        "query_frames": torch.zeros(3, 1, 3, 2, 2),
        key: frame_no.expand(3, *shape).clone(),
        "target_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]).bool(),
        "target_scores": torch.arange(3 * 4.0).view(3, 4),
    }
    seen = set()
    for seed in range(20):
        out = augment(
            {k: v.clone() for k, v in batch.items()}, random.Random(seed), target_frames=2
        )
        kept = out[key].flatten(2)[..., 0]
        assert (
            out[key].shape[:2] == out["target_mask"].shape == out["target_scores"].shape == (3, 2)
        )
        assert torch.equal(out["target_scores"], kept)  # scores travel with their frames
        for b in range(2):  # 4 and 3 valid frames: 2 distinct valid ones, in order
            f = (kept[b] - 4 * b).long().tolist()
            assert f[0] < f[1] and all(x < (4, 3)[b] for x in f) and out["target_mask"][b].all()
            seen.add((b, *f))
        assert kept[2, 0] == 8 and out["target_mask"][2].tolist() == [True, False]  # 1 valid
    assert len(seen) >= 8  # the subsets vary with the seed (6 + 3 possible)
    same = augment({k: v.clone() for k, v in batch.items()}, random.Random(0), target_frames=4)
    assert torch.equal(same[key], batch[key])  # as many as packed: unchanged
