"""The training state saved and restored whole; a crafted checkpoint file is refused, not run."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sharding.batch import Task
from train.queue import MomentumEncoder, TargetQueue
from train.state import RNGState, TrainState


class Planted:
    """Pickles to a call that creates `marker`: what a crafted checkpoint file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def _parts(tmp_path, seed: int) -> dict:
    from tests.tiny import tiny_model

    torch.manual_seed(seed)
    model, _ = tiny_model(tmp_path / f"m{seed}", freeze_vision=False)
    queue = TargetQueue(6, (1, 16))
    queue.enqueue(torch.randn(4, 1, 16), torch.arange(4))
    ema = MomentumEncoder(model, 0.9)
    return {"train": TrainState(), "queue": queue, "ema": ema, "rng": RNGState()}


def test_state_round_trip_restores_every_part(tmp_path):
    from train.checkpoint import load_file

    saved = _parts(tmp_path, 0)
    saved["train"].step, saved["train"].run_id = 7, "abc"
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # numpy keeps a spare Gaussian: it must come back too
    torch.save({name: part.state_dict() for name, part in saved.items()}, tmp_path / "state.pt")
    expected = _draws()

    restored = _parts(tmp_path, 1)
    assert not torch.equal(restored["queue"].features, saved["queue"].features)
    for name, part in load_file(tmp_path / "state.pt").items():  # weights_only: plain data
        restored[name].load_state_dict(part)
    got = _draws()
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
    assert (restored["train"].step, restored["train"].run_id) == (7, "abc")
    assert torch.equal(restored["queue"].features, saved["queue"].features)
    assert (restored["queue"].ptr, restored["queue"].filled) == (4, 4)
    for name, t in saved["ema"].params.items():
        assert torch.equal(restored["ema"].params[name], t), name


def test_a_part_missing_from_the_checkpoint_is_an_error_naming_it(tmp_path):
    from configs.schema import Config
    from train import checkpoint as files
    from train.checkpointer import Checkpointer

    tag_dir = tmp_path / "ckpt" / "step00000003"
    tag_dir.mkdir(parents=True)
    torch.save({"train": TrainState(step=3).state_dict()}, tag_dir / files.STATE_FILE)
    marker = {"step": 3, "world": 1, "files": files._inventory(tag_dir)}
    (tag_dir / files.COMPLETE).write_text(json.dumps(marker))
    parts = {"train": TrainState(), "queue": TargetQueue(4, (2,))}
    with pytest.raises(files.CheckpointError, match="train_state.pt: has no queue state"):
        Checkpointer(tmp_path / "ckpt", Config(), parts, world=1).restore()
    restored = TrainState()  # without a queue in the config the same checkpoint restores
    assert Checkpointer(tmp_path / "ckpt", Config(), {"train": restored}, 1).restore().tag == (
        "step00000003"
    )
    assert restored.step == 3


def _engine(out: Path, stage: int = 2):
    from tests.tiny import tiny_model
    from train.engine import build_engine

    torch.manual_seed(0)
    model, _ = tiny_model(out / "tok", freeze_vision=False, train_target_encoder=True)
    params = model.trainable_parameters()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
    }
    if (out / "universal").exists():
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = build_engine(model, params, torch.optim.AdamW(params, lr=1e-2), None, config)
    return engine


def _step(engine, seed: int) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    engine(Task.ENCODE_TARGET_FRAMES, x).pow(2).mean().backward()
    engine.step()


def _crafted_files_are_refused(rank, world, out_dir):
    from configs.schema import Config
    from train.checkpoint import CheckpointError, load_checkpoint, load_file, rank_file, read_state
    from train.checkpointer import Checkpointer
    from train.engine import init_distributed

    init_distributed(60)
    out = Path(out_dir)
    engine = _engine(out)
    _step(engine, 0)
    cfg = Config()
    cfg.train.keep_checkpoints = 3
    queue = TargetQueue(4, (1, 16))
    queue.enqueue(torch.randn(3, 1, 16), torch.arange(3))
    state = TrainState(step=1, run_id="r1")
    saver = Checkpointer(out / "ckpt", cfg, {"train": state, "queue": queue}, world=1)
    saver.restore_engine(engine)  # nothing to restore: it keeps the engine for saving
    tag = saver.save(1)
    after_save = torch.rand(2)

    # a genuine checkpoint (DeepSpeed's optimizer files too) loads with weights_only=True
    restored, restored_queue = TrainState(), TargetQueue(4, (1, 16))
    loader = Checkpointer(out / "ckpt", cfg, {"train": restored, "queue": restored_queue}, 1)
    assert loader.restore().tag == tag and loader.restored.same_ranks
    loader.restore_engine(engine)
    assert (restored.step, restored.run_id) == (1, "r1")
    assert torch.equal(restored_queue.features, queue.features)
    assert torch.equal(torch.rand(2), after_save)  # the RNG is back where it was saved

    marker = out / "pwned"
    for name in (
        "rng_rank0.pt",
        "train_state.pt",
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ):
        path = out / "ckpt" / tag / name
        original = path.read_bytes()
        torch.save({"step": Planted(marker)}, path)
        try:  # the files one by one (a checkpoint restore would skip it for its checksum)
            read_state(out / "ckpt", tag)
            load_checkpoint(engine, out / "ckpt", tag)
            load_file(rank_file(out / "ckpt", tag))
        except CheckpointError as err:
            assert name in str(err) and "refused" in str(err), err
        else:
            raise AssertionError(f"{name}: a crafted file was loaded")
        assert not marker.exists(), f"{name}: the crafted file ran code"
        path.write_bytes(original)
    for step in (2, 3):  # two more checkpoints for the fallback test
        _step(engine, step)
        state.step = step
        saver.save(step)
    (out / "result.json").write_text(json.dumps({"ok": True}))


def test_a_crafted_checkpoint_file_is_refused_not_run_and_a_damaged_one_skipped(tmp_path, caplog):
    from tests.multirank import run_ranks
    from train.checkpoint import complete_tags, newest_intact

    run_ranks(_crafted_files_are_refused, 1, (str(tmp_path),))
    assert json.loads((tmp_path / "result.json").read_text()) == {"ok": True}
    assert not (tmp_path / "pwned").exists()
    # the plant is real: an unrestricted load runs it
    torch.save({"step": Planted(tmp_path / "pwned")}, tmp_path / "planted.pt")
    torch.load(tmp_path / "planted.pt", weights_only=False)
    assert (tmp_path / "pwned").exists()

    # a truncated file in the newest checkpoint, a flipped byte in the one before: both are
    # skipped with a warning naming the file, the newest intact one is used
    ckpt = tmp_path / "ckpt"
    assert complete_tags(ckpt) == ["step00000001", "step00000002", "step00000003"]
    assert newest_intact(ckpt) == "step00000003"
    truncated = ckpt / "step00000003" / "mp_rank_00_model_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    flipped = ckpt / "step00000002" / "rng_rank0.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="train.checkpoint"):
        assert newest_intact(ckpt) == "step00000001"
    warned = caplog.text
    assert f"{truncated}: 1000 bytes" in warned and f"{flipped}: content differs" in warned


def _save_two_ranks(rank, world, out_dir):
    from train.checkpoint import save_checkpoint
    from train.engine import init_distributed

    init_distributed(60)
    engine = _engine(Path(out_dir))
    for step in range(3):
        _step(engine, 10 * rank + step)
    save_checkpoint(engine, Path(out_dir) / "ckpt", 3, shared={}, own={})


def _load_one_rank(rank, world, out_dir):
    from train.checkpoint import (
        CheckpointError,
        load_checkpoint,
        needs_universal,
        save_checkpoint,
        to_universal,
    )
    from train.engine import init_distributed

    init_distributed(60)
    out = Path(out_dir)
    assert needs_universal(out / "ckpt", "step00000003", world)
    (out / "universal").touch()  # tells `_engine` to set checkpoint.load_universal
    engine = _engine(out)
    universal = to_universal(out / "ckpt", "step00000003")
    load_checkpoint(engine, out / "ckpt", universal)
    assert engine.global_steps == 3
    save_checkpoint(engine, out / "again", 3, shared={}, own={})
    to_universal(out / "again", "step00000003")
    # DeepSpeed's universal loader unpickles anything: each file is read weights-only first
    planted = next((out / "ckpt" / universal / "zero").glob("*/fp32.pt"))
    original = planted.read_bytes()
    torch.save({"param": Planted(out / "pwned")}, planted)
    try:
        load_checkpoint(_engine(out), out / "ckpt", universal)
    except CheckpointError as err:
        assert planted.name in str(err) and "refused" in str(err), err
    else:
        raise AssertionError("a crafted universal file was loaded")
    assert not (out / "pwned").exists()
    planted.write_bytes(original)


@pytest.mark.e2e
def test_zero2_optimizer_state_moves_from_two_ranks_to_one_exactly(tmp_path):
    """DeepSpeed refuses ZeRO partitions saved by another number of ranks; the universal format
    re-partitions them (read without running code). Saved again on one rank and converted, every
    parameter's fp32 weights and Adam moments equal the two-rank originals."""
    from tests.multirank import run_ranks

    run_ranks(_save_two_ranks, 2, (str(tmp_path),))
    run_ranks(_load_one_rank, 1, (str(tmp_path),))
    a, b = (tmp_path / d / "step00000003/universal/zero" for d in ("ckpt", "again"))
    compared = 0
    for param in sorted(p.name for p in a.iterdir() if p.is_dir()):
        for name in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
            if (a / param / name).exists():
                x, y = (torch.load(d / param / name, weights_only=True)["param"] for d in (a, b))
                assert torch.equal(x, y), (param, name)
                compared += 1
    assert compared > 100


def test_resume_none_moves_the_old_checkpoints_aside(tmp_path):
    from train.checkpoint import clear

    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step00000010").mkdir(parents=True)
    (ckpt_dir / "step00000010" / "COMPLETE").write_text("{}")
    clear(ckpt_dir)
    assert not ckpt_dir.exists()
    (aside,) = tmp_path.glob("checkpoints.replaced-*")
    assert (aside / "step00000010" / "COMPLETE").is_file()  # nothing deleted
