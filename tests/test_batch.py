import numpy as np
import torch

from sharding.batch import collate
from tests.tiny import tiny_model


def test_collate_pads_frames_and_falls_back_to_uniform_scores(tmp_path):
    _, tok = tiny_model(tmp_path)
    frame = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    samples = [
        {"query_frames": frame, "target_frames": np.zeros((3, 16, 16, 3), np.uint8), "edit": "make it red",
         "scores": [0.1, 0.2, 0.3], "target_id": 4, "caption": "a red circle"},
        {"query_frames": frame, "target_frames": np.zeros((2, 16, 16, 3), np.uint8), "edit": "make it blue",
         "scores": [0.1, 0.2, 0.3], "target_id": 9, "caption": "a blue circle"},
    ]  # fmt: skip
    batch = collate(samples, tok, image_size=32, max_text_len=8)
    assert batch["query_frames"].shape == (2, 1, 3, 32, 32)
    assert batch["target_frames"].shape == (2, 3, 3, 32, 32)
    assert batch["target_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert torch.allclose(batch["target_scores"][0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.isnan(batch["target_scores"][1]).all()  # 3 scores for 2 frames: uniform
    assert batch["target_ids"].tolist() == [4, 9] and batch["input_ids"].shape == (2, 8)
    assert batch["caption_input_ids"].shape == (2, 8)
