"""NaN / Inf never reach the weights, a checkpoint or an export: a non-finite loss skips its
micro-batch before the backward (counted, named, up to train.nonfinite_limit); non-finite
weights are refused at a checkpoint; a non-finite target row never enters the queue."""

import logging

import pytest
import torch

from tests.test_loop import _job
from train.loop import Meter, train_epoch
from train.nonfinite import NonFiniteError, check_finite_weights
from train.queue import TargetQueue


def test_a_nan_loss_skips_its_micro_batch_before_the_backward_and_is_counted(caplog):
    job = _job(total_steps=6, accum=1, log_every=1)
    backward = []
    job.engine.backward = lambda loss: backward.append(float(loss))
    losses = job.objective.loss

    def loss(engine, batch, *args):
        value, metrics = losses(engine, batch, *args)
        if int(batch["loss"]) in (2, 5):
            value = value * float("nan")
        return value, metrics

    job.objective.loss = loss
    with caplog.at_level(logging.WARNING, logger="train.nonfinite"):
        train_epoch(job, Meter())
    assert job.state.step == 6 and job.state.nonfinite_skipped == 2
    assert backward == [0.0, 1.0, 3.0, 4.0, 6.0, 7.0]  # never the NaN ones
    warnings = [r.getMessage() for r in caplog.records]
    assert "at step 3, records 2: micro-batch skipped (1 of at most 10)" in warnings[0]
    assert job.tracker.records[-1][1]["nonfinite_skipped"] == 2  # logged with the step


def test_more_skips_than_the_limit_stop_with_one_line():
    job = _job(total_steps=9, accum=1, log_every=1)
    job.cfg.train.nonfinite_limit = 1
    job.objective.loss = lambda engine, batch, *a: (torch.tensor(float("inf")), {})
    with pytest.raises(NonFiniteError, match=r"in 2 micro-batches \(train.nonfinite_limit=1\)"):
        train_epoch(job, Meter())
    assert job.state.step == 0


def test_non_finite_weights_are_refused_naming_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    check_finite_weights(model, "checkpoint at step 4")  # finite: nothing said
    with torch.no_grad():
        model[1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"checkpoint at step 4: .*parameter 1.bias"):
        check_finite_weights(model, "checkpoint at step 4")
    model[1].bias.requires_grad_(False)  # frozen weights are not the training's
    check_finite_weights(model, "x")


def test_a_non_finite_target_row_becomes_an_empty_slot_of_the_queue():
    queue = TargetQueue(4, (1, 2))
    rows = torch.tensor([[[1.0, 0.0]], [[float("nan"), 0.0]], [[0.0, 1.0]]])
    queue.enqueue(rows, torch.tensor([7, 8, 9]))
    features, ids = queue.valid()
    assert ids.tolist() == [7, -1, 9] and torch.isfinite(features).all()
    # the empty slot is never a negative; the others are, except the row's own target
    assert queue.negatives_mask(torch.tensor([7, 5])).tolist() == [
        [False, False, True],
        [True, False, True],
    ]
