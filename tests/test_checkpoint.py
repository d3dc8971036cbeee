"""The training state saved and restored whole; a crafted checkpoint file is refused, not run."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from train.queue import MomentumEncoder, TargetQueue
from train.state import TrainState


class Planted:
    """Pickles to a call that creates `marker`: what a crafted checkpoint file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def _state(tmp_path, seed: int) -> TrainState:
    from tests.tiny import tiny_model

    torch.manual_seed(seed)
    model, _ = tiny_model(tmp_path / f"m{seed}", freeze_vision=False)
    queue = TargetQueue(6, (1, 16))
    queue.enqueue(torch.randn(4, 1, 16), torch.arange(4))
    return TrainState(queue=queue, momentum=MomentumEncoder(model, 0.9))


def test_state_round_trip_restores_every_part(tmp_path):
    from train.checkpoint import load_file

    saved = _state(tmp_path, 0)
    saved.step, saved.epoch, saved.batch_in_epoch, saved.run_id = 7, 2, 5, "abc"
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # numpy keeps a spare Gaussian: it must come back too
    torch.save(saved.state_dict(), tmp_path / "state.pt")
    expected = _draws()

    restored = _state(tmp_path, 1)
    assert not torch.equal(restored.queue.features, saved.queue.features)
    restored.load_state_dict(load_file(tmp_path / "state.pt"))  # weights_only: tensors, plain types
    got = _draws()
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
    assert (restored.step, restored.epoch, restored.batch_in_epoch, restored.run_id) == (
        7,
        2,
        5,
        "abc",
    )
    assert torch.equal(restored.queue.features, saved.queue.features)
    assert (restored.queue.ptr, restored.queue.filled) == (4, 4)
    for name, t in saved.momentum.params.items():
        assert torch.equal(restored.momentum.params[name], t), name


def test_a_queue_missing_from_the_checkpoint_is_an_error(tmp_path):
    saved = TrainState().state_dict()
    with pytest.raises(ValueError, match="no queue state"):
        TrainState(queue=TargetQueue(4, (2,))).load_state_dict(saved)


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
    engine("encode_target_frames", x).pow(2).mean().backward()
    engine.step()


def _crafted_files_are_refused(rank, world, out_dir):
    from train.checkpoint import CheckpointError, load_checkpoint, read_state, save_checkpoint
    from train.engine import init_distributed

    init_distributed(60)
    out = Path(out_dir)
    engine = _engine(out)
    _step(engine, 0)
    queue = TargetQueue(4, (1, 16))
    queue.enqueue(torch.randn(3, 1, 16), torch.arange(3))
    state = TrainState(queue=queue, step=1, epoch=0, batch_in_epoch=1, run_id="r1")
    tag = save_checkpoint(engine, out / "ckpt", state, keep=3, config={"optim": {"lr": 1.0}})
    after_save = torch.rand(2)

    # a genuine checkpoint (DeepSpeed's optimizer files too) loads with weights_only=True
    restored = TrainState(queue=TargetQueue(4, (1, 16)))
    restored.load_state_dict(read_state(out / "ckpt", tag))
    load_checkpoint(engine, out / "ckpt", tag)
    assert (restored.step, restored.batch_in_epoch, restored.run_id) == (1, 1, "r1")
    assert torch.equal(restored.queue.features, queue.features)
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
        try:
            read_state(out / "ckpt", tag)
            load_checkpoint(engine, out / "ckpt", tag)
        except CheckpointError as err:
            assert name in str(err) and "refused" in str(err), err
        else:
            raise AssertionError(f"{name}: a crafted file was loaded")
        assert not marker.exists(), f"{name}: the crafted file ran code"
        path.write_bytes(original)
    for step in (2, 3):  # two more checkpoints for the fallback test
        _step(engine, step)
        state.step = step
        save_checkpoint(engine, out / "ckpt", state, keep=3)
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
    save_checkpoint(engine, Path(out_dir) / "ckpt", TrainState(step=3))


def _load_one_rank(rank, world, out_dir):
    from train.checkpoint import load_checkpoint, needs_universal, save_checkpoint, to_universal
    from train.engine import init_distributed

    init_distributed(60)
    out = Path(out_dir)
    assert needs_universal(out / "ckpt", "step00000003", world)
    (out / "universal").touch()  # tells `_engine` to set checkpoint.load_universal
    engine = _engine(out)
    load_checkpoint(
        engine, out / "ckpt", to_universal(out / "ckpt", "step00000003"), same_ranks=False
    )
    assert engine.global_steps == 3
    save_checkpoint(engine, out / "again", TrainState(step=3))
    to_universal(out / "again", "step00000003")


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
