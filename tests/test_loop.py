"""The step loop's shape on stand-ins for the engine, reader and tracker (no DeepSpeed): optimizer
steps, log windows, the loss read from the device at logging steps only, the time-left estimate."""

import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import IterableDataset

from configs.schema import Config
from sharding.reader import BatchInfo
from train import loop
from train.loader import RunShape, TrainLoader
from train.loop import Job, Meter, train_epoch
from train.state import TrainState
from train.stop import StopRequest


class Reader(IterableDataset):
    """The shard reader's interface: batch i holds record i, its loss is i."""

    def __init__(self, n: int):
        self.n, self.start, self.world, self.batch_size, self.counts = n, 0, 1, 1, [n]
        self.mix = None  # one source

    def set_position(self, epoch, start_batch, num_workers, excluded=()):
        self.start = start_batch

    def batches_per_epoch(self):
        return self.n

    def __iter__(self):
        for i in range(self.start, self.n):
            info = BatchInfo([str(i)], [i], [i], {"worker": 0, "undecodable": 0})
            yield {"target_ids": torch.tensor([i, i]), "loss": torch.tensor(float(i))}, info


class Engine:
    """Applies the optimizer every `accum` micro-steps, as DeepSpeed's engine does."""

    def __init__(self, accum: int):
        self.accum, self.micro, self.global_steps = accum, 0, 0
        self.device = torch.device("cpu")  # where the loop moves each batch
        self.module = torch.nn.Linear(1, 1)  # the weights a checkpoint checks

    def backward(self, loss):
        pass

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.global_steps += 1


class Tracker:
    def __init__(self):
        self.records, self.run_id = [], "run"

    def log_metrics(self, metrics, step):
        self.records.append((step, metrics))

    def spill(self):  # before a checkpoint
        pass

    def set_tags(self, tags):
        self.records.append(("tags", tags))

    def finish(self, status="FINISHED"):
        self.records.append(("finish", status))


class Checkpointer:
    """Records the steps saved; `during_save` runs inside a save (a signal, say)."""

    def __init__(self, during_save=None):
        self.saved, self.during_save, self.dir = [], during_save, Path("ckpt")

    def save(self, step):
        if self.during_save:
            self.during_save(step)
        self.saved.append(step)
        return f"step{step:08d}"


class Scheduler:
    def get_last_lr(self):
        return [0.5]


def _job(
    total_steps: int,
    accum: int,
    log_every: int,
    on_batch=None,
    out=Path("."),
    checkpointer=None,
    stop=None,
    eval_every=0,
    ckpt_every=0,
) -> Job:
    cfg = Config()
    cfg.train.grad_accum, cfg.train.log_every = accum, log_every
    cfg.train.eval_every, cfg.train.ckpt_every, cfg.shards.loader_workers = (
        eval_every,
        ckpt_every,
        0,
    )

    class Objective:
        def loss(self, engine, batch, loss_cfg, queue, momentum):
            if on_batch:
                on_batch(int(batch["loss"]))
            return batch["loss"], {"loss": batch["loss"]}

    return Job(
        cfg,
        0,
        2,
        out,
        Engine(accum),
        Scheduler(),
        None,
        TrainLoader(Reader(10), workers=0, seed=0),
        Objective(),
        TrainState(),
        None,
        None,
        checkpointer or Checkpointer(),
        Tracker(),
        RunShape(2, 1, accum, 10 // accum, total_steps),
        None,  # no validation split: `validate` is replaced where a test validates
        stop or StopRequest(),
    )


def test_steps_windows_and_one_device_read_per_log_line(monkeypatch, caplog):
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t.dtype) or item(t))
    job, meter = _job(total_steps=5, accum=2, log_every=2), Meter()
    with caplog.at_level(logging.INFO, logger="train.loop"):
        train_epoch(job, meter)
    assert (job.state.step, job.loader.batch_in_epoch) == (5, 10)
    steps = [step for step, _ in job.tracker.records]
    assert steps == [2, 4, 5]  # every log_every steps, and the last
    # each window averages its micro-batches' losses: 0..3, 4..7, 8..9
    assert [m["loss"] for _, m in job.tracker.records] == [1.5, 5.5, 8.5]
    # the loss left the device once per log line, not per micro-step (the int64 read is the
    # DataLoader's seed draw)
    assert reads.count(torch.float32) == 3
    assert job.tracker.records[0][1]["samples_per_s"] > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 3 and "step 2/5" in lines[0] and "left ?" not in lines[1]
    assert "left " in lines[1] and "loss 5.5000" in lines[1]


def test_the_loop_resumes_inside_an_epoch_and_stops_at_the_last_step():
    job, meter = _job(total_steps=3, accum=1, log_every=1), Meter()
    job.state.step, job.loader.batch_in_epoch, job.engine.global_steps = 1, 1, 1
    train_epoch(job, meter)
    assert (job.state.step, job.loader.batch_in_epoch) == (3, 3)
    assert [m["loss"] for _, m in job.tracker.records] == [1.0, 2.0]
    assert job.loader.consumed == [1, 2]  # the positions a checkpoint gathers into `seen`
    assert job.loader.state_dict()["seen"].tolist() == [1, 2]


def test_time_left_counts_from_after_the_first_step(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("train.loop.time.perf_counter", lambda: now[0])
    meter = Meter()
    meter.stepped(1)  # start-up costs are before this point
    assert meter.seconds_left(1, 11) is None
    now[0] = 104.0
    meter.stepped(3)  # only the first call sets the origin
    assert meter.seconds_left(3, 11) == pytest.approx(16.0)  # 2 s per step, 8 steps left


def _signal(sig=signal.SIGUSR1):
    os.kill(os.getpid(), sig)


@pytest.fixture
def stop():
    request = StopRequest().install()
    yield request
    request.uninstall()


def test_a_signal_mid_accumulation_stops_at_the_step_boundary_with_a_checkpoint(stop):
    # micro-batches 0,1 are step 1, 2,3 step 2: the signal during step 2's first micro-batch
    job = _job(5, accum=2, log_every=10, stop=stop, on_batch=lambda i: i == 2 and _signal())
    train_epoch(job, Meter())
    assert job.stopped == "SIGUSR1" and job.state.step == 2
    assert job.checkpointer.saved == [2]  # at the boundary, not before (no ckpt_every)
    assert job.loader.batch_in_epoch == 4  # the checkpoint's position: nothing half-done


def test_a_signal_during_a_validation_stops_after_it_and_one_before_it_defers_it(
    stop, monkeypatch, tmp_path
):
    metrics = {"R@1": 1.0}
    validated, signal_during = [], [2]

    def validate(job):
        validated.append(job.state.step)
        if job.state.step in signal_during:
            _signal(signal.SIGTERM)
        return SimpleNamespace(metrics=metrics)

    monkeypatch.setattr(loop, "validate", validate)
    job = _job(9, 1, 10, out=tmp_path, stop=stop, eval_every=2)
    train_epoch(job, Meter())
    assert job.stopped == "SIGTERM" and job.state.step == 2 and validated == [2]
    assert job.checkpointer.saved == [2] and not job.state.validation_due
    # a signal before a due validation: saved with the validation still due, not run
    other = StopRequest().install()
    job = _job(
        9, 1, 10, out=tmp_path, stop=other, eval_every=2, on_batch=lambda i: i == 3 and _signal()
    )
    validated.clear(), signal_during.clear()
    train_epoch(job, Meter())
    other.uninstall()
    assert job.state.step == 4 and validated == [2] and job.state.validation_due
    assert job.checkpointer.saved == [4]


def test_a_signal_during_a_checkpoint_write_stops_at_that_checkpoint(stop):
    checkpointer = Checkpointer(during_save=lambda step: step == 2 and _signal())
    job = _job(9, 1, 10, stop=stop, checkpointer=checkpointer, ckpt_every=2)
    train_epoch(job, Meter())
    assert job.stopped == "SIGUSR1" and job.state.step == 2 and checkpointer.saved == [2]


def test_no_stop_at_the_last_step_and_none_without_a_signal(stop):
    job = _job(3, 1, 10, stop=stop, on_batch=lambda i: i == 2 and _signal())
    train_epoch(job, Meter())  # the last step: `finish` saves, validates and exports
    assert job.stopped is None and job.state.step == 3 and job.checkpointer.saved == []


def test_a_signal_at_the_last_step_stops_after_the_final_checkpoint(stop, tmp_path, monkeypatch):
    """The final checkpoint is saved; validation and export are left to the resumed job."""
    import json

    from train.stop import Stopped

    job = _job(3, 1, 10, out=tmp_path, stop=stop, on_batch=lambda i: i == 2 and _signal())
    train_epoch(job, Meter())
    monkeypatch.setattr(loop, "validate", lambda job: pytest.fail("validated after the stop"))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)  # one process here
    with pytest.raises(Stopped) as stopped:
        loop.finish(job, Meter())
    assert stopped.value.step == 3 and job.checkpointer.saved == [3]
    assert json.loads((tmp_path / "stopped.json").read_text())["step"] == 3
    assert not (tmp_path / "export").exists()
    assert ("finish", "KILLED") in job.tracker.records  # the resumed job reopens the run


def test_a_second_ctrl_c_interrupts_at_once_a_repeated_sigterm_does_not(stop):
    _signal(signal.SIGTERM)
    _signal(signal.SIGTERM)  # the launcher forwarding what the ranks already had
    assert stop.signal == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        _signal(signal.SIGINT)
