import itertools

from data import mining, synthetic
from data.captions import CaptionedVideo
from data.mining import is_meaningful, mine, mine_caption_pairs, normalise_words
from data.webvid_covr import read_annotations


def _planted_pairs(specs):
    """Unordered caption pairs the generator planted: same family, one attribute apart."""
    planted = set()
    for a, b in itertools.combinations(specs, 2):
        diff = sum(a.attributes[k] != b.attributes[k] for k in a.attributes)
        if a.family == b.family and diff == 1:
            planted.add(frozenset((a.caption, b.caption)))
    return planted


def test_mining_finds_exactly_the_planted_pairs():
    specs = synthetic.plan_corpus(400, family_size=6, seed=11)
    captions = [normalise_words(s.caption) for s in specs]
    found = {
        frozenset((" ".join(captions[p.caption1]), " ".join(captions[p.caption2])))
        for p in mine_caption_pairs(captions)
    }
    planted = _planted_pairs(specs)
    assert len(planted) > 400
    assert found == planted


def test_pairs_differ_at_the_reported_position():
    caps = [normalise_words(c) for c in ["a red car", "a blue car", "a red bus", "one red car"]]
    pairs = {(p.caption1, p.caption2, p.position) for p in mine_caption_pairs(caps)}
    assert pairs == {(0, 1, 1), (0, 2, 2), (0, 3, 0)}


def test_stop_words_and_numbers_are_dropped():
    assert not any(map(is_meaningful, ["the", "a", "3", "2.5", "10th", "two", "-", "1980s"]))
    assert all(map(is_meaningful, ["dog", "red", "night"]))
    videos = [
        CaptionedVideo(str(i), "p", c)
        for i, c in enumerate(
            [
                "a dog on the beach",
                "a cat on the beach",
                "a dog on a beach",
                "3 dogs running",
                "5 dogs running",
            ]
        )
    ]
    result = mine(videos, val_fraction=0, test_fraction=0)
    assert result.stats["one_word_pairs"] == 3 and result.stats["caption_pairs"] == 1
    edits = {(t.txt1, t.txt2) for t in result.splits["train"]}
    assert edits == {
        ("a dog on the beach", "a cat on the beach"),
        ("a cat on the beach", "a dog on the beach"),
    }


def test_at_most_n_videos_per_identical_caption():
    videos = [CaptionedVideo(str(i), "p", "A red car.") for i in range(25)]
    videos += [CaptionedVideo(str(100 + i), "p", "a blue car") for i in range(3)]
    result = mine(videos, max_videos_per_caption=10, val_fraction=0, test_fraction=0)
    assert result.stats["videos_kept"] == 13
    assert len(result.splits["train"]) == 2 * 10 * 3
    t = result.splits["train"][0]
    assert t.edit == mining.template_edit(t.txt1, t.txt2, "red", "blue") or "blue" in t.edit


def test_synthetic_splits_are_disjoint_and_test_has_one_row_per_target(small_corpus):
    root, _ = small_corpus
    splits = {s: read_annotations(root / f"{s}.csv") for s in ("train", "val", "test")}
    videos = {s: {t.pth1 for t in r} | {t.pth2 for t in r} for s, r in splits.items()}
    assert all(videos.values())
    assert not videos["train"] & videos["val"]
    assert not videos["train"] & videos["test"]
    assert not videos["val"] & videos["test"]
    targets = [t.pth2 for t in splits["test"]]
    assert len(targets) == len(set(targets))
    for t in splits["train"] + splits["val"]:
        assert sum(a != b for a, b in zip(t.txt1.split(), t.txt2.split())) == 1


def test_transformers_edit_hook_runs_a_local_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]", "a", "red", "blue", "car", "make", "it", "\\n", "Edit", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]"
    ).save_pretrained(tmp_path)
    config = GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    edit = mining.transformers_edit_fn(str(tmp_path), max_new_tokens=4)
    text = edit("a red car", "a blue car", "red", "blue")
    assert isinstance(text, str) and text
