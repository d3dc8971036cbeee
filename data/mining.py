"""Mine WebVid-CoVR triplets from any caption table.

Recipe (docs/METHOD.md §1): caption pairs that differ by exactly one word, the differing
words not stop words or numbers; at most N videos per identical caption; an edit text per pair;
train/val/test with disjoint videos; val/test keep one pair per caption pair, test one row per
target.

Scale: captions are never compared pairwise. Each caption contributes one key per word position,
a 64-bit hash of the caption with that position masked (a linear hash computed for all captions
at once with numpy); sorting the keys puts captions that differ only at that position together.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from data.captions import CaptionedVideo
from data.webvid_covr import Triplet

STOP_WORDS = frozenset(
    """a an the and or but if of at by for with about against between into through during before
    after above below to from up down in out on off over under again further then once here there
    when where why how all any both each few more most other some such no nor not only own same so
    than too very s t can will just don should now i me my we our you your he him his she her it
    its they them their what which who whom this that these those am is are was were be been being
    have has had having do does did doing would could ought""".split()
)
NUMBER_WORDS = frozenset(
    """zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen
    fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty
    ninety hundred thousand million first second third""".split()
)
_PUNCT = "\"'.,;:!?()[]{}"
_NUMBER = re.compile(r"^[+-]?\d+([.,:]\d+)*(st|nd|rd|th|s|k|m)?$")

EDIT_TEMPLATES = (
    "Replace {w1} with {w2}",
    "Change {w1} to {w2}",
    "Make it {w2}",
    "Make it {w2} instead of {w1}",
    "Show {w2} instead of {w1}",
)

EditFn = Callable[[str, str, str, str], str]  # (txt1, txt2, w1, w2) -> edit text
ScoresFn = Callable[[str, str], list[float]]  # (pth1, pth2) -> per-target-frame scores


def normalise_words(caption: str) -> tuple[str, ...]:
    return tuple(w.strip(_PUNCT) for w in caption.lower().split())


def is_meaningful(word: str) -> bool:
    """A differing word worth an edit: not a stop word, a number or a bare symbol."""
    return (
        any(c.isalpha() for c in word)
        and word not in STOP_WORDS
        and word not in NUMBER_WORDS
        and not _NUMBER.match(word)
    )


@dataclass(frozen=True)
class CaptionPair:
    """Two distinct (normalised) captions differing exactly at word `position`."""

    caption1: int  # index into the unique-caption list
    caption2: int
    position: int


def mine_caption_pairs(
    captions: list[tuple[str, ...]], seed: int = 0, progress: bool = False
) -> list[CaptionPair]:
    """All pairs of distinct word sequences that differ at exactly one position, unfiltered."""
    n = len(captions)
    if n < 2:
        return []
    lengths = np.fromiter((len(c) for c in captions), dtype=np.int64, count=n)
    max_len = int(lengths.max())
    vocab: dict[str, int] = {}
    ids = np.zeros((n, max_len), dtype=np.uint64)
    for row, words in enumerate(captions):
        ids[row, : len(words)] = [vocab.setdefault(w, len(vocab) + 1) for w in words]

    rng = np.random.default_rng(seed)
    pos_mult = rng.integers(1, 2**63, size=max_len, dtype=np.uint64) | np.uint64(1)
    pos_salt = rng.integers(1, 2**63, size=max_len, dtype=np.uint64)
    len_salt = rng.integers(1, 2**63, size=max_len + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        terms = ids * pos_mult  # (n, L); padded positions contribute 0
        total = terms.sum(axis=1, dtype=np.uint64) + len_salt[lengths]
        rows, cols = np.nonzero(np.arange(max_len)[None, :] < lengths[:, None])
        keys = total[rows] - terms[rows, cols] + pos_salt[cols]
    order = np.argsort(keys, kind="stable")
    keys, rows, cols = keys[order], rows[order], cols[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    multi = np.flatnonzero(ends - starts > 1)

    pairs: list[CaptionPair] = []
    for b in tqdm(multi, desc="one-word buckets", disable=not progress, mininterval=1.0):
        members = list(zip(rows[starts[b] : ends[b]].tolist(), cols[starts[b] : ends[b]].tolist()))
        # verify: hash collisions are possible in principle, so group by the real masked words
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = defaultdict(list)
        for r, c in members:
            words = captions[r]
            groups[(c, words[:c] + words[c + 1 :])].append(r)
        for (position, _), group in groups.items():
            group.sort()
            for i, a in enumerate(group):
                for b2 in group[i + 1 :]:
                    pairs.append(CaptionPair(a, b2, position))
    return pairs


def template_edit(txt1: str, txt2: str, w1: str, w2: str) -> str:
    """Rule-based edit text; the template is a deterministic function of the word pair."""
    index = sum(map(ord, w1 + "|" + w2)) % len(EDIT_TEMPLATES)
    return EDIT_TEMPLATES[index].format(w1=w1, w2=w2)


def transformers_edit_fn(model_dir: str, max_new_tokens: int = 24) -> EditFn:
    """Edit texts from a local transformers causal LM (greedy; no hub access). An empty
    generation falls back to the template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()

    def edit(txt1: str, txt2: str, w1: str, w2: str) -> str:
        inputs = tokenizer(f"{txt1} \n {txt2} \n Edit :", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip().split("\n")[0]
        return text.strip() or template_edit(txt1, txt2, w1, w2)

    return edit


@dataclass
class MiningResult:
    splits: dict[str, list[Triplet]]
    stats: dict[str, int] = field(default_factory=dict)


def _original_word(caption: str, position: int) -> str:
    return caption.split()[position].strip(_PUNCT)


def _assign_splits(
    pairs: list[CaptionPair],
    videos_per_caption: dict[int, list],
    val: float,
    test: float,
    seed: int,
) -> dict[int, str]:
    """Caption -> split, by connected components of the pair graph, so that no video is in two
    splits. Components are shuffled by seed and fill val, then test; the rest is train."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        parent[find(p.caption1)] = find(p.caption2)
    components: dict[int, list[int]] = defaultdict(list)
    for c in parent:
        components[find(c)].append(c)
    comps = sorted(components.values(), key=min)
    random.Random(seed).shuffle(comps)
    total = sum(len(videos_per_caption[c]) for comp in comps for c in comp)
    budget = {"val": val * total, "test": test * total}
    split_of: dict[int, str] = {}
    for comp in comps:
        size = sum(len(videos_per_caption[c]) for c in comp)
        name = next((s for s in ("val", "test") if 0 < size <= budget[s]), "train")
        if name != "train":
            budget[name] -= size
        for c in comp:
            split_of[c] = name
    return split_of


def mine(
    videos: list[CaptionedVideo],
    max_videos_per_caption: int = 10,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 1234,
    edit_fn: EditFn = template_edit,
    scores_fn: ScoresFn | None = None,
    progress: bool = False,
) -> MiningResult:
    """Triplets for train/val/test in the published format from a caption table."""
    rng = random.Random(seed)
    by_caption: dict[tuple[str, ...], list[CaptionedVideo]] = defaultdict(list)
    for v in videos:
        words = normalise_words(v.caption)
        if words:
            by_caption[words].append(v)
    captions = list(by_caption)
    videos_of: dict[int, list[CaptionedVideo]] = {}
    for i, words in enumerate(captions):
        group = sorted(by_caption[words], key=lambda v: v.pth)
        if len(group) > max_videos_per_caption:
            group = rng.sample(group, max_videos_per_caption)
        videos_of[i] = group

    raw = mine_caption_pairs(captions, seed=seed, progress=progress)
    pairs = [
        p
        for p in raw
        if is_meaningful(captions[p.caption1][p.position])
        and is_meaningful(captions[p.caption2][p.position])
    ]
    split_of = _assign_splits(pairs, videos_of, val_fraction, test_fraction, seed)

    splits: dict[str, list[Triplet]] = {"train": [], "val": [], "test": []}
    for p in tqdm(pairs, desc="triplets", disable=not progress, mininterval=1.0):
        split = split_of[p.caption1]
        directions = [(p.caption1, p.caption2), (p.caption2, p.caption1)]
        if split != "train":  # one pair per caption pair, in a random direction
            directions = [directions[rng.randrange(2)]]
        for c1, c2 in directions:
            v1s, v2s = videos_of[c1], videos_of[c2]
            video_pairs = [(a, b) for a in v1s for b in v2s]
            if split != "train":
                video_pairs = [video_pairs[rng.randrange(len(video_pairs))]]
            for a, b in video_pairs:
                w1 = _original_word(a.caption, p.position)
                w2 = _original_word(b.caption, p.position)
                words1, words2 = set(captions[c1]), set(captions[c2])
                splits[split].append(
                    Triplet(
                        pth1=a.pth,
                        pth2=b.pth,
                        txt1=a.caption,
                        txt2=b.caption,
                        edit=edit_fn(a.caption, b.caption, w1, w2),
                        scores=scores_fn(a.pth, b.pth) if scores_fn else [],
                        sim_txt=round(len(words1 & words2) / len(words1 | words2), 4),
                    )
                )
    seen: set[str] = set()
    test_rows = []
    for t in splits["test"]:  # one row per target
        if t.pth2 not in seen:
            seen.add(t.pth2)
            test_rows.append(t)
    splits["test"] = test_rows

    stats = {
        "videos": len(videos),
        "unique_captions": len(captions),
        "videos_kept": sum(len(v) for v in videos_of.values()),
        "one_word_pairs": len(raw),
        "pairs_dropped_stopword_or_number": len(raw) - len(pairs),
        "caption_pairs": len(pairs),
    }
    stats.update({f"triplets_{name}": len(rows) for name, rows in splits.items()})
    for name, rows in splits.items():
        stats[f"videos_{name}"] = len({t.pth1 for t in rows} | {t.pth2 for t in rows})
    return MiningResult(splits, stats)
