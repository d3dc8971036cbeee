import itertools

import numpy as np

from data import synthetic
from data.captions import read_caption_table, read_metadata
from data.video import count_frames, load_frames
from data.webvid_covr import read_annotations, video_path


def _word_distance(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(a.split(), b.split()))


def test_plan_is_deterministic_and_families_share_uncaptioned_attributes():
    a = synthetic.plan_corpus(200, family_size=5, seed=1)
    assert a == synthetic.plan_corpus(200, family_size=5, seed=1)
    assert a != synthetic.plan_corpus(200, family_size=5, seed=2)
    for _, members in itertools.groupby(a, key=lambda s: s.family):
        members = list(members)
        assert len({(m.position, m.size, m.speed) for m in members}) == 1
        base = members[0].caption
        assert all(_word_distance(base, m.caption) == 1 for m in members[1:])


def test_captions_of_different_families_differ_in_two_words_or_more():
    specs = synthetic.plan_corpus(1000, family_size=5, seed=0)
    assert len({s.caption for s in specs}) == 1000
    for a, b in itertools.combinations(specs[::3], 2):
        if a.family != b.family:
            assert _word_distance(a.caption, b.caption) >= 2


def test_uncaptioned_attributes_are_visible():
    spec = synthetic.plan_corpus(10, family_size=5, seed=4)[0]
    moved = synthetic.VideoSpec(**{**spec.__dict__, "position": (0.3, 0.3)})
    resized = synthetic.VideoSpec(**{**spec.__dict__, "size": spec.size * 0.6})
    frames = synthetic.render_frames(spec, 4, 32)
    assert not np.array_equal(frames, synthetic.render_frames(moved, 4, 32))
    assert not np.array_equal(frames, synthetic.render_frames(resized, 4, 32))


def test_corpus_round_trips_through_annotations_and_decoder(small_corpus):
    root, summary = small_corpus
    table = read_caption_table(root / "captions.csv")
    meta = read_metadata(root / "metadata.jsonl")
    specs = {s.pth: s for s in synthetic.read_specs(root)}
    assert len(table) == len(meta) == len(specs) == 60
    assert summary["videos"] == 60 and summary["families"] == 12
    for row in table:
        assert specs[row.pth].caption == row.caption
    rows = read_annotations(root / "train.csv")
    assert rows, "mining produced no training triplets"
    for t in rows[:5]:
        assert t.txt1 == specs[t.pth1].caption and t.txt2 == specs[t.pth2].caption
        assert len(t.scores) == 15 and all(0.2 <= s <= 0.4 for s in t.scores)
        path = video_path(root / "videos", t.pth2)
        assert count_frames(path) == 12
        assert load_frames(path, n=15, size=32).shape == (12, 3, 32, 32)  # every frame


def test_rerun_keeps_existing_videos(small_corpus, tmp_path):
    root, _ = small_corpus
    some = sorted((root / "videos").rglob("*.mp4"))[0]
    before = some.stat().st_mtime_ns
    synthetic.write_corpus(root, videos=60, family_size=5, frames=12, size=32, workers=1, seed=7)
    assert some.stat().st_mtime_ns == before
