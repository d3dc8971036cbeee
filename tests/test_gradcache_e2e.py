"""`train.chunk_size` on real DeepSpeed engines: the same steps as the batch in one piece, on one
rank for every ZeRO stage with gradient accumulation, and through the real launcher on 2 ranks
with ZeRO 2 and 3, the queue and the momentum encoder."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.multirank import run_ranks
from tests.test_engine_e2e import launch, setup  # noqa: F401  (the shards and config fixture)
from tests.tiny import tiny_model

pytestmark = pytest.mark.e2e


def _zero_gradient(name: str) -> bool:
    """Attention key biases: softmax over keys ignores a shift shared by all keys, so their
    gradient is 0 in exact arithmetic and rounding noise (1e-9) in fp32, with any batching."""
    return name.endswith("key.bias")


def _engine_steps(rank, world, out_dir):
    """Per ZeRO stage, 2 optimizer steps of 2 micro-batches each, whole vs in chunks (3, 3, 1):
    the weight updates agree. SGD: linear in the gradients, so a chunk counted twice, dropped or
    overwritten shows as an O(1) difference, while fp32 rounding stays near 1e-5."""
    import deepspeed

    from configs import load_config
    from train.engine import build_engine, deepspeed_config, init_distributed
    from train.gradcache import chunked_backward
    from train.objective import COVR
    from train.queue import TargetQueue

    init_distributed(60)
    from tests.test_gradcache import _batch

    for stage in (0, 1, 2, 3):
        updates = []
        for chunk in (0, 3):
            torch.manual_seed(0)
            model, tok = tiny_model(Path(out_dir), dropout=0.0)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            cfg = load_config(
                None, ["train.batch_size=7", "train.grad_accum=2", f"deepspeed.zero_stage={stage}"]
            )
            params = model.trainable_parameters()
            sgd = torch.optim.SGD(params, lr=0.5, momentum=0.9)
            engine, *_ = build_engine(model, params, sgd, None, deepspeed_config(cfg))
            queue = TargetQueue(10, (1, model.cfg.embed_dim))
            for micro in range(4):
                batch = _batch(tok, seed=micro)
                if chunk:
                    chunked_backward(engine, batch, COVR, cfg.loss, chunk, queue)
                else:
                    loss, _ = COVR.loss(engine, batch, cfg.loss, queue)
                    engine.backward(loss)
                engine.step()
            assert engine.global_steps == 2
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                updates.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
            engine.destroy()
        whole, chunked = updates
        moved = [n for n in whole if whole[n].abs().max() > 0 and not _zero_gradient(n)]
        assert len(moved) > 10, stage
        for n in moved:
            err = (whole[n] - chunked[n]).norm() / whole[n].norm()
            assert err < 1e-3, (stage, n, err.item())


def test_one_rank_every_zero_stage_with_accumulation(tmp_path):
    run_ranks(_engine_steps, 1, (str(tmp_path),))


COMMON = [
    "model.dropout=0",
    "train.max_steps=3",
    "train.epochs=1",
    "train.ckpt_every=0",
    "train.batch_size=4",
]


@pytest.mark.parametrize("stage", [2, 3])
def test_launcher_two_ranks_chunks_equal_the_whole_batch(setup, tmp_path, stage):  # noqa: F811
    """fp32, the queue (16) and the momentum encoder (trainable target encoder): 3 steps with
    chunks of 3 + 1 give the weights of the global batch of 8 in one piece."""
    runs = {}
    for chunk in (0, 3):
        out = tmp_path / f"chunk{chunk}"
        runs[chunk] = launch(
            setup, out, *COMMON, f"deepspeed.zero_stage={stage}", f"train.chunk_size={chunk}"
        )
    assert runs[0]["steps"] == runs[3]["steps"] == 3
    a = load_file(tmp_path / "chunk0/export/model.safetensors")
    b = load_file(tmp_path / "chunk3/export/model.safetensors")
    assert a.keys() == b.keys()
    # Adam divides by sqrt(v): the rounding noise of a zero gradient becomes a full step
    compared = [k for k in a if not _zero_gradient(k)]
    assert len(compared) > 50
    for k in compared:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, (a[k] - b[k]).abs().max().item())
    assert abs(runs[0]["train"]["loss"] - runs[3]["train"]["loss"]) < 1e-5


def test_launcher_bf16_with_activation_checkpointing(setup, tmp_path):  # noqa: F811
    """bf16 and recomputed Q-Former layers run with chunks and stay close to the whole batch."""
    extra = [
        "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16",
        "deepspeed.activation_checkpointing=true",
    ]
    runs = {
        c: launch(setup, tmp_path / f"c{c}", *COMMON, *extra, f"train.chunk_size={c}")
        for c in (0, 2)
    }
    losses = [runs[c]["train"]["loss"] for c in (0, 2)]
    assert abs(losses[0] - losses[1]) < 0.02 * abs(losses[0]), losses
    a = load_file(tmp_path / "c0/export/model.safetensors")
    b = load_file(tmp_path / "c2/export/model.safetensors")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 5e-3, worst
