import random

import numpy as np
import pytest
import torch

from data import synthetic
from data.video import (
    CLIP_MEAN,
    VideoDecodeError,
    centre_indices,
    count_frames,
    decode_frames,
    load_frames,
    select_indices,
    to_model_input,
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    spec = synthetic.plan_corpus(5, family_size=5, seed=3)[0]
    frames = synthetic.render_frames(spec, 20, 32)
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    synthetic.write_mp4(path, frames, fps=10)
    return path, frames


def test_centre_indices_follow_the_reference_rule():
    assert centre_indices(30, 1) == [15]  # the query frame: frame count // 2
    # a = linspace(0, 30, 16) cut to integers = 0, 2, 4, ... 30: (a_i + a_i+1 - 1) // 2 = a_i
    assert centre_indices(30, 15) == list(range(0, 30, 2))
    # a = 0, 6, 13, 20, 26, 33, 40, 46, 53, 60, 66, 73, 80, 86, 93, 100 (6.67 steps, floored)
    assert centre_indices(100, 15) == [2, 9, 16, 22, 29, 36, 42, 49, 56, 62, 69, 76, 82, 89, 96]
    assert centre_indices(4, 15) == [0, 1, 2, 3]  # shorter than 15: every frame, none repeated


def test_random_indices_stay_in_their_interval():
    rng = random.Random(0)
    for _ in range(50):
        idx = select_indices(30, 3, "random", rng)
        assert 0 <= idx[0] < 10 <= idx[1] < 20 <= idx[2] < 30
    with pytest.raises(ValueError, match="unknown frame mode"):
        select_indices(30, 3, "middle")


def test_decode_matches_the_encoded_frames(clip):
    path, frames = clip
    assert count_frames(path) == 20
    got = decode_frames(path, [10, 0, 19, 10])
    assert got.shape == (4, 32, 32, 3) and got.dtype == np.uint8
    err = np.abs(got.astype(int) - frames[[10, 0, 19, 10]].astype(int)).mean()
    assert err < 8  # lossy H.264, but the same pictures
    middle = load_frames(path, n=1)
    assert np.array_equal(middle[0], got[0])


def test_model_input_is_resized_and_clip_normalised(clip):
    x = load_frames(clip[0], n=15, size=48)
    assert x.shape == (15, 3, 48, 48) and x.dtype == torch.float32
    grey = to_model_input(np.full((1, 8, 8, 3), 255 * np.array(CLIP_MEAN), dtype=np.float64), 8)
    assert grey.abs().max() < 0.01


def test_truncated_file_is_a_catchable_error(clip, tmp_path):
    data = clip[0].read_bytes()
    for cut in (len(data) // 2, len(data) - 200):
        bad = tmp_path / f"cut{cut}.mp4"
        bad.write_bytes(data[:cut])
        with pytest.raises(VideoDecodeError, match=str(bad.name)):
            load_frames(bad, n=15)


def test_corrupt_and_missing_files(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(VideoDecodeError, match="junk.mp4: cannot open"):
        load_frames(junk)
    with pytest.raises(VideoDecodeError, match="file not found"):
        load_frames(tmp_path / "absent.mp4")
