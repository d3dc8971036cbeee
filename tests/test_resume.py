"""Resuming: settings that change the training are refused; the data position is re-split when
the ranks or loader workers change, so no record of the epoch is repeated or lost."""

import json
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from configs import load_config
from configs.schema import CONFIG_DIR, SamplerConfig, ShardConfig, to_dict
from sharding.batch import collate
from sharding.manifest import read_manifest
from sharding.pack import pack
from sharding.reader import ShardReader, shard_urls
from tests.conftest import ROOT
from train.loader import TrainLoader
from train.resume import SettingsChanged, check_before_start, check_settings


def test_a_setting_that_changes_training_is_refused_naming_it():
    saved = to_dict(load_config(CONFIG_DIR / "demo.yaml"))
    cfg = load_config(CONFIG_DIR / "demo.yaml", ["optim.lr=1e-4", "loss.beta=0.0"])
    with pytest.raises(SettingsChanged) as err:
        check_settings(cfg, saved, "runs/x/checkpoints/step00000200")
    msg = str(err.value)
    assert "optim.lr: 0.002 -> 0.0001" in msg and "loss.beta: 0.5 -> 0.0" in msg
    assert "train.out_dir" in msg and "train.resume=none" in msg  # how to train with them
    assert "train.epochs" not in msg


def test_settings_that_do_not_change_training_may_differ_and_are_listed():
    saved = to_dict(load_config(CONFIG_DIR / "demo.yaml"))
    saved["optim"].pop("min_lr_ratio")  # a key a newer version added: its default holds
    saved["sampler"]["retired_key"] = 3  # and one a newer version removed
    epochs = saved["train"]["epochs"]
    overrides = [
        f"train.epochs={epochs + 15}",
        "train.max_steps=900",
        "shards.loader_workers=2",
        "eval.batch_size=8",
        "tracking.experiment=other",
        "train.log_every=5",
        "train.out_dir=/elsewhere",
    ]
    free = check_settings(load_config(CONFIG_DIR / "demo.yaml", overrides), saved, "x")
    assert (
        f"train.epochs: {epochs} -> {epochs + 15}" in free
        and "shards.loader_workers: 1 -> 2" in free
    )
    assert any(line.startswith("optim.min_lr_ratio: (absent)") for line in free)
    assert len(free) == len(overrides) + 2


def _fake_checkpoint(out, cfg):
    tag = out / "train" / "checkpoints" / "step00000200"
    tag.mkdir(parents=True)
    (tag / "config.json").write_text(json.dumps(to_dict(cfg)))
    (tag / "COMPLETE").write_text(json.dumps({"step": 200}))


@pytest.mark.parametrize("script", ["train", "demo"])
def test_launchers_refuse_a_changed_setting_before_starting(tmp_path, script):
    """`launch/demo.py optim.lr=1e-4` after a finished demo used to resume its final checkpoint,
    train nothing and report the old model under the new lr."""
    paths = [
        f"data.root={tmp_path / 'corpus'}",
        f"shards.dir={tmp_path / 'shards'}",
        f"model.tokenizer={tmp_path / 'corpus' / 'tokenizer'}",
        f"train.out_dir={tmp_path / 'train'}",
    ]
    _fake_checkpoint(tmp_path, load_config(CONFIG_DIR / "demo.yaml", paths))
    (tmp_path / "corpus" / "tokenizer").mkdir(parents=True)  # what the train pre-flight looks for
    for split in ("train", "val"):
        (tmp_path / "shards" / split).mkdir(parents=True)
        (tmp_path / "shards" / split / "manifest.json").write_text('{"shards": []}')
    if script == "demo":
        cmd = [
            sys.executable,
            str(ROOT / "launch/demo.py"),
            "--out",
            str(tmp_path),
            "optim.lr=1e-4",
        ]
    else:
        cmd = [
            sys.executable,
            str(ROOT / "launch/train.py"),
            "--config",
            str(CONFIG_DIR / "demo.yaml"),
            *paths,
            "optim.lr=1e-4",
        ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "settings changed: " in proc.stderr and "optim.lr: 0.002 -> 0.0001" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "corpus" / "train.csv").exists()  # refused before anything ran
    # a fresh run is what the user asks for with train.resume=none: no refusal then
    cfg = load_config(CONFIG_DIR / "demo.yaml", [*paths, "optim.lr=1e-4", "train.resume=none"])
    assert check_before_start(cfg) == []


def test_loader_gathers_positions_and_re_splits_when_ranks_change(shards):
    out, tok = shards
    urls, counts = shard_urls(out, read_manifest(out))

    def loader(world, workers):
        fn = partial(collate, tokenizer=tok, image_size=32, max_text_len=8)
        reader = ShardReader(urls, counts, batch_size=2, collate=fn, world=world, seed=5)
        return TrainLoader(reader, workers, seed=5)

    two = loader(2, 1)
    two.consumed += [5, 1, 3]
    assert two.state_dict()["seen"].tolist() == [1, 3, 5]
    two.consumed += [3, 7]  # a repeat stays visible in `seen`
    two.batch_in_epoch = 4
    saved = two.state_dict()
    assert saved["seen"].tolist() == [1, 3, 3, 5, 7] and two.consumed == []
    assert (saved["world"], saved["workers"]) == (2, 1)

    same = loader(2, 0)  # 0 loader workers count as 1: the same layout
    same.load_state_dict(saved)
    assert same.moved is None and same.batch_in_epoch == 4 and same.describe_move() is None

    moved = loader(1, 2)
    moved.load_state_dict(saved)
    assert moved.moved == (2, 1) and moved.batch_in_epoch == 0
    assert moved.excluded.tolist() == [1, 3, 5, 7]
    assert "2 x 1 -> 1 x 2" in moved.describe_move()
    again = loader(1, 2)  # saved in the new layout: continued as it is
    again.load_state_dict(moved.state_dict())
    assert again.moved is None and torch.equal(again.excluded, moved.excluded)
    again.next_epoch()
    assert len(again.seen) == len(again.excluded) == again.batch_in_epoch == 0


CFG = ShardConfig(samples_per_shard=3, target_frames=2, workers=1, seed=3)


@pytest.fixture(scope="module")
def shards(small_corpus, tmp_path_factory):
    from tests.tiny import tiny_model

    root, _ = small_corpus
    out = tmp_path_factory.mktemp("shards")
    pack(root / "train.csv", root / "videos", out, CFG)
    tok = tiny_model(tmp_path_factory.mktemp("tok"))[1]
    return out, tok


def _batches(shards, rank, world, workers, start=0, excluded=(), limit=None, sampler="hns"):
    out, tok = shards
    urls, counts = shard_urls(out, read_manifest(out))
    fn = partial(collate, tokenizer=tok, image_size=32, max_text_len=8)
    reader = ShardReader(
        urls,
        counts,
        batch_size=2,
        collate=fn,
        rank=rank,
        world=world,
        sampler=SamplerConfig(kind=sampler, buffer=4),
        seed=5,
    )
    reader.set_position(0, start, workers, excluded)
    got = []
    for _, info in DataLoader(reader, batch_size=None, num_workers=workers):
        if limit is not None and len(got) == limit:
            break
        got.append(info)
    return got, reader


@pytest.mark.parametrize(
    ("before", "after"), [((2, 2), (1, 1)), ((1, 1), (2, 1)), ((2, 1), (3, 2))]
)
def test_a_re_split_epoch_repeats_nothing_and_leaves_less_than_a_batch_per_rank(
    shards, before, after
):
    (w0, k0), (w1, k1) = before, after
    first = [b for r in range(w0) for b in _batches(shards, r, w0, k0, limit=3)[0]]
    seen = [p for b in first for p in b.drawn]
    assert len(seen) == 3 * 2 * w0
    rest, readers = [], []
    for r in range(w1):
        batches, reader = _batches(shards, r, w1, k1, excluded=seen)
        rest += batches
        readers.append(reader)
    assert len({len(b.keys) for b in rest}) <= 1
    positions = seen + [p for b in rest for p in b.drawn]
    keys = [k for b in first + rest for k in b.keys]
    assert len(set(positions)) == len(positions) and len(set(keys)) == len(keys)  # no repeat
    left = sum(readers[0].counts) - len(positions)
    assert 0 <= left < w1 * 2  # less than a batch (of 2) per rank
    assert len(rest) == readers[0].batches_per_epoch() * w1


def test_a_re_split_with_nothing_left_yields_no_batch(shards):
    _, reader = _batches(shards, 0, 1, 1, limit=0)
    everything = list(range(sum(reader.counts) - 1))
    batches, reader = _batches(shards, 0, 1, 1, excluded=everything)
    assert batches == [] and reader.batches_per_epoch() == 0


@pytest.fixture(scope="module")
def e2e_config(small_corpus, tmp_path_factory):
    from tests.tiny import write_tiny_config

    root, _ = small_corpus
    base = tmp_path_factory.mktemp("resume")
    cfg = ShardConfig(samples_per_shard=5, target_frames=3, workers=2, seed=1)
    for split in ("train", "val"):
        pack(root / f"{split}.csv", root / "videos", base / "shards" / split, cfg)
    path = write_tiny_config(base / "cfg.yaml", base / "shards", root / "tokenizer")
    records = read_manifest(base / "shards" / "train")["totals"]["samples"]
    return path, records


def _seen(out, tag):
    from train.checkpoint import load_file

    return load_file(out / "checkpoints" / tag / "train_state.pt")["loader"]["seen"].tolist()


FEW = ["train.epochs=1", "train.ckpt_every=1", "train.keep_checkpoints=5", "eval.report_queries=0"]


@pytest.mark.e2e
def test_two_ranks_to_one_from_the_newest_intact_checkpoint(e2e_config, tmp_path):
    """Resumed on one rank after a two-rank run whose newest checkpoint was truncated: the
    previous one is used (the bad file named), DeepSpeed's ZeRO-2 partitions are re-partitioned,
    and the epoch ends with every record consumed once (what the new split cannot fill, less
    than a batch, is left)."""
    from tests.test_engine_e2e import launch

    config, records = e2e_config
    out = tmp_path / "run"
    first = launch(config, out, *FEW, "train.max_steps=2", ranks=2)
    bad = out / "checkpoints/step00000002/mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[:2000])
    at_step1 = _seen(out, "step00000001")
    assert len(at_step1) == 2 * 4  # one batch of 4 on each of 2 ranks

    resumed = launch(config, out, *FEW, ranks=1)  # train.max_steps back to 0: the whole epoch
    console = (out / "console.log").read_text()
    assert f"{bad}: 2000 bytes" in console and "resumed from" in console
    assert "2 x 1 -> 1 x 1" in console and "universal checkpoint" in console
    assert "train.max_steps: 2 -> 0" in console  # a free change, listed
    rest = (records - 8) // 4
    assert resumed["steps"] == 1 + rest
    seen = _seen(out, f"step{resumed['steps']:08d}")
    assert len(seen) == len(set(seen)) == 8 + 4 * rest  # nothing twice, the epoch used up
    assert set(at_step1) <= set(seen) and records - len(seen) < 4
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run continues


@pytest.mark.e2e
def test_one_rank_to_two(e2e_config, tmp_path):
    from tests.test_engine_e2e import launch

    config, records = e2e_config
    out = tmp_path / "run"
    launch(config, out, *FEW, "train.max_steps=3", ranks=1)
    resumed = launch(config, out, *FEW, ranks=2)
    assert "1 x 1 -> 2 x 1" in (out / "console.log").read_text()
    per_rank = (records - 12) // 2 // 4
    assert resumed["steps"] == 3 + per_rank
    seen = _seen(out, f"step{resumed['steps']:08d}")
    assert len(seen) == len(set(seen)) == 12 + 2 * 4 * per_rank
    assert records - len(seen) < 2 * 4 + 2
