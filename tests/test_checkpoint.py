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


def _crafted_files_are_refused(rank, world, out_dir):
    import deepspeed

    from tests.tiny import tiny_model
    from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from train.engine import build_engine

    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(out_dir)
    torch.manual_seed(0)
    model, _ = tiny_model(out / "tok", train_target_encoder=True)  # a backward through targets
    params = model.trainable_parameters()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}  # fmt: skip
    engine, *_ = build_engine(model, params, torch.optim.AdamW(params), None, config)
    engine("encode_target_frames", torch.randn(2, 3, 32, 32)).sum().backward()
    engine.step()
    queue = TargetQueue(4, (1, 16))
    queue.enqueue(torch.randn(3, 1, 16), torch.arange(3))
    state = TrainState(queue=queue, step=1, epoch=0, batch_in_epoch=1, run_id="r1")
    tag = save_checkpoint(engine, out / "ckpt", state)
    after_save = torch.rand(2)

    # a genuine checkpoint (DeepSpeed's optimizer files too) loads with weights_only=True
    restored = TrainState(queue=TargetQueue(4, (1, 16)))
    load_checkpoint(engine, out / "ckpt", tag, restored)
    assert (restored.step, restored.batch_in_epoch, restored.run_id) == (1, 1, "r1")
    assert torch.equal(restored.queue.features, queue.features)
    assert torch.equal(torch.rand(2), after_save)  # the RNG is back where it was saved

    marker = out / "pwned"
    for name in (
        "rng_rank0.pt",
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ):
        path = out / "ckpt" / tag / name
        original = path.read_bytes()
        torch.save({"step": Planted(marker)}, path)
        try:
            load_checkpoint(engine, out / "ckpt", tag, TrainState(queue=TargetQueue(4, (1, 16))))
        except CheckpointError as err:
            assert name in str(err) and "refused" in str(err), err
        else:
            raise AssertionError(f"{name}: a crafted file was loaded")
        assert not marker.exists(), f"{name}: the crafted file ran code"
        path.write_bytes(original)
    (out / "result.json").write_text(json.dumps({"ok": True}))


def test_a_crafted_checkpoint_file_is_refused_not_run(tmp_path):
    from tests.multirank import run_ranks

    run_ranks(_crafted_files_are_refused, 1, (str(tmp_path),))
    assert json.loads((tmp_path / "result.json").read_text()) == {"ok": True}
    assert not (tmp_path / "pwned").exists()
    # the plant is real: an unrestricted load runs it
    torch.save({"step": Planted(tmp_path / "pwned")}, tmp_path / "planted.pt")
    torch.load(tmp_path / "planted.pt", weights_only=False)
    assert (tmp_path / "pwned").exists()
