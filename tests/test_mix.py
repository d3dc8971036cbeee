"""`shards.mix`: several weighted shard sets in one training run; the weights hold over an epoch
and across a resume on another number of ranks, with nothing repeated or skipped."""

from collections import Counter
from functools import partial
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from configs import ConfigError, load_config
from configs.schema import SamplerConfig, ShardConfig
from sharding.batch import collate
from sharding.manifest import read_manifest
from sharding.mix import TARGET_ID_STRIDE, Source, epoch_shards, quotas
from sharding.pack import pack
from sharding.reader import ShardReader, shard_urls

CFG = ShardConfig(samples_per_shard=3, target_frames=2, workers=1, seed=3)
BATCH = 2


def test_quotas_follow_the_weights_and_fill_the_epoch():
    a, b = Source("a", ["a0"], [10], 3.0), Source("b", ["b0"], [10], 1.0)
    assert quotas([a, b], 20) == [15, 5]
    assert quotas([a, b, Source("c", ["c"], [1], 3.0)], 10) == [4, 2, 4]  # largest remainders
    assert sum(quotas([a, b, Source("c", ["c"], [1], 2.0)], 7)) == 7


def test_epoch_shards_are_a_function_of_seed_and_epoch_and_cycle_a_small_source():
    big = Source("big", [f"b{i}" for i in range(6)], [5] * 6, 1.0)
    small = Source("small", ["s0", "s1"], [3, 2], 1.0)  # 5 records asked for 17 or 18
    plan = epoch_shards([big, small], 0, seed=1)
    assert plan.quotas == [18, 17] and sum(plan.counts) == 35
    for index, quota in enumerate(plan.quotas):
        assert sum(n for n, s in zip(plan.counts, plan.source) if s == index) == quota
    assert plan.urls.count("s0") >= 3  # cycled: the small source's shards repeat
    assert epoch_shards([big, small], 0, seed=1) == plan
    assert epoch_shards([big, small], 1, seed=1).urls != plan.urls


@pytest.fixture(scope="module")
def sources(small_corpus, tmp_path_factory):
    """Two shard sets with disjoint targets (the corpus's train and val splits), weights 3:1."""
    from tests.tiny import tiny_model

    root, _ = small_corpus
    base = tmp_path_factory.mktemp("mix")
    out = []
    for split, weight in (("train", 3.0), ("val", 1.0)):
        pack(root / f"{split}.csv", root / "videos", base / split, CFG)
        urls, counts = shard_urls(base / split, read_manifest(base / split))
        out.append(Source(split, urls, counts, weight))
    tok = tiny_model(tmp_path_factory.mktemp("tok"))[1]
    return out, tok


def _run(sources, tok, rank, world, workers, epoch=0, excluded=(), limit=None):
    fn = partial(collate, tokenizer=tok, image_size=32, max_text_len=8)
    reader = ShardReader(
        [],
        [],
        batch_size=BATCH,
        collate=fn,
        rank=rank,
        world=world,
        sampler=SamplerConfig(kind="random", buffer=4),
        seed=5,
        mix=sources,
    )
    reader.set_position(epoch, 0, workers, excluded)
    got = []
    for batch, info in DataLoader(reader, batch_size=None, num_workers=workers):
        if limit is not None and len(got) == limit:
            break
        got.append((batch, info))
    return got, reader


def test_an_epoch_draws_each_source_its_weighted_share_on_two_ranks(sources):
    mix, tok = sources
    runs = [_run(mix, tok, rank, 2, 2) for rank in range(2)]
    infos = [info for got, _ in runs for _, info in got]
    reader = runs[0][1]
    plan = epoch_shards(mix, 0, 5)
    drawn = Counter(s for info in infos for s in info.sources)
    used = sum(drawn.values())
    assert used == reader.batches_per_epoch() * 2 * BATCH
    assert sum(plan.counts) - used < 2 * BATCH  # the epoch's tail: less than a batch per rank
    for index, quota in enumerate(plan.quotas):
        assert quota - 2 * BATCH < drawn[index] <= quota  # 3:1 of the epoch
    positions = [p for info in infos for p in info.drawn]
    assert len(set(positions)) == len(positions)  # every position of the epoch at most once
    # target ids are distinct across sources: the val split's ids were shifted
    ids = [int(t) for batch, _ in runs[0][0] for t in batch["target_ids"]]
    assert any(t >= TARGET_ID_STRIDE for t in ids) and any(t < TARGET_ID_STRIDE for t in ids)


def test_the_weights_hold_across_a_resume_on_another_number_of_ranks(sources):
    mix, tok = sources
    first = [info for r in range(2) for _, info in _run(mix, tok, r, 2, 2, epoch=1, limit=2)[0]]
    seen = [p for info in first for p in info.drawn]
    rest = [info for _, info in _run(mix, tok, 0, 1, 2, epoch=1, excluded=seen)[0]]
    positions = seen + [p for info in rest for p in info.drawn]
    assert len(set(positions)) == len(positions)  # nothing repeated
    plan = epoch_shards(mix, 1, 5)
    assert sum(plan.counts) - len(positions) < 2 * BATCH  # nothing skipped but the tail
    drawn = Counter(s for info in first + rest for s in info.sources)
    for index, quota in enumerate(plan.quotas):
        assert quota - 2 * BATCH < drawn[index] <= quota


def test_mixed_sources_check_their_manifest_checksums(sources, tmp_path):
    import shutil
    from dataclasses import replace

    mix, tok = sources
    changed = []
    for source in mix:
        folder = tmp_path / source.name
        shutil.copytree(Path(source.urls[0]).parent, folder)
        manifest = read_manifest(folder)
        urls, _ = shard_urls(folder, manifest)
        for url in urls:  # one byte of a stored frame flipped: the tar still reads
            data = bytearray(Path(url).read_bytes())
            data[len(data) // 2] ^= 0xFF
            Path(url).write_bytes(bytes(data))
        shas = [s["sha256"] for s in manifest["shards"]]
        sizes = [s["bytes"] for s in manifest["shards"]]
        changed.append(replace(source, urls=urls, checksums=shas, sizes=sizes))
    got, reader = _run(changed, tok, 0, 1, 0)
    assert reader.checksums == [c for c in epoch_shards(changed, 0, 5).checksums]
    assert got[-1][1].stats["checksum_mismatch"] > 0  # named and counted, as for one source


def test_mix_config_is_checked_naming_the_source():
    cfg = load_config(None, ["shards.mix=[{dir: a, weight: 3}, {dir: b}]"])
    assert [(m.dir, m.weight) for m in cfg.shards.mix] == [("a", 3.0), ("b", 1.0)]
    with pytest.raises(ConfigError, match=r"shards.mix\[1\].weight"):
        load_config(None, ["shards.mix=[{dir: a}, {dir: b, weight: 0}]"])
    with pytest.raises(ConfigError, match=r"shards.mix\[0\].dir"):
        load_config(None, ["shards.mix=[{weight: 2}]"])


@pytest.mark.e2e
def test_deepspeed_training_on_a_mix_logs_each_sources_share(small_corpus, tmp_path):
    import json
    import subprocess

    from mlflow import MlflowClient

    from tests.conftest import ROOT
    from tests.test_embed_targets import tiny_overrides
    from train.network import deepspeed_command

    root, _ = small_corpus
    for split in ("train", "val"):
        pack(root / f"{split}.csv", root / "videos", tmp_path / "webvid" / split, CFG)
    pack(root / "val.csv", root / "videos", tmp_path / "second", CFG)  # a second train source
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("{}\n")
    mix = f"shards.mix=[{{dir: {tmp_path / 'webvid' / 'train'}, weight: 3}}, "
    mix += f"{{dir: {tmp_path / 'second'}, weight: 1}}]"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = deepspeed_command(
        ROOT / "launch/train.py",
        1,
        "--config",
        cfg_file,
        f"shards.dir={tmp_path / 'webvid'}",
        mix,
        "shards.loader_workers=1",
        "train.batch_size=2",
        "train.max_steps=4",
        "train.log_every=2",
        "eval.ks=[1,5]",
        "deepspeed.zero_stage=0",
        f"tracking.uri={uri}",
        f"train.out_dir={tmp_path / 'run'}",
        *tiny_overrides(root / "tokenizer"),
    )
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "shards.mix: records per epoch 0-train" in done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    metrics = MlflowClient(uri).get_run(summary["mlflow_run_id"]).data.metrics
    shares = {k: v for k, v in metrics.items() if k.startswith("data_share_")}
    assert set(shares) == {"data_share_0-train", "data_share_1-second"}
    assert sum(shares.values()) == pytest.approx(1.0)
    missing = subprocess.run(
        [*cmd, "shards.mix=[{dir: " + str(tmp_path / "nothing") + "}]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "shards.mix[0].dir" in missing.stderr
