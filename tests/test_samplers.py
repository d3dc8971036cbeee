from collections import Counter

import pytest

from configs.schema import SamplerConfig
from sharding.samplers import BatchComposer


def stream(groups=20, per_group=4):
    return [{"id": g * per_group + k, "group": g} for g in range(groups) for k in range(per_group)]


@pytest.mark.parametrize("kind", ["random", "hns", "fs", "mix"])
def test_fixed_size_batches_and_every_sample_once(kind):
    samples = stream(21, 4)[:83]  # 83 samples, batch 8 -> 10 batches, 3 dropped
    batches = list(BatchComposer(SamplerConfig(kind, buffer=32), 8, seed=1)(iter(samples)))
    assert len(batches) == 83 // 8 and all(len(b) == 8 for b in batches)
    ids = [s["id"] for b in batches for s in b]
    assert len(ids) == len(set(ids))


def test_hns_packs_whole_groups():
    batches = list(BatchComposer(SamplerConfig("hns", buffer=40), 8, seed=2)(iter(stream(30, 4))))
    for batch in batches:
        assert sorted(Counter(s["group"] for s in batch).values()) == [4, 4]


def test_fs_never_two_of_a_group():
    composer = BatchComposer(SamplerConfig("fs", buffer=64), 8, seed=3)
    batches = list(composer(iter(stream(40, 4))))
    strict = batches[: len(batches) - composer.stats["relaxed"]]
    assert len(strict) >= 15
    for batch in strict:
        assert len({s["group"] for s in batch}) == 8
    # a random batch of 8 from groups of 4 would almost surely repeat a group
    random_batches = list(
        BatchComposer(SamplerConfig("random", buffer=64), 8, seed=3)(iter(stream(40, 4)))
    )
    assert any(len({s["group"] for s in b}) < 8 for b in random_batches)


def test_mix_uses_both_kinds():
    batches = list(
        BatchComposer(SamplerConfig("mix", beta=0.5, buffer=64), 8, seed=4)(iter(stream(60, 4)))
    )
    distinct = [len({s["group"] for s in b}) for b in batches]
    assert 8 in distinct and 2 in distinct


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown sampler"):
        BatchComposer(SamplerConfig("hard"), 8)
    with pytest.raises(ValueError, match="buffer"):
        BatchComposer(SamplerConfig("fs", buffer=4), 8)
