"""Run a test function on N real processes (gloo), each rank with its own environment; or once
in a fresh process (a test that starts Ray: once gRPC ran in a process, a process forked from it,
such as a DataLoader worker, may crash)."""

import os
import traceback

import torch.multiprocessing as mp

from train.network import free_port


def _entry(rank, world, port, fn, args, errors):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_ranks(fn, world: int = 2, args: tuple = ()) -> None:
    """`fn(rank, world, *args)` on `world` processes; re-raises the first rank's failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _entry, args=(world, free_port(), fn, args, errors), nprocs=world, start_method="spawn"
        )
    except Exception as err:
        detail = errors.get() if not errors.empty() else str(err)
        raise AssertionError(detail) from None


def in_fresh_process(fn, *args):
    """`fn(*args)` in a spawned process; its return value (or its exception) comes back."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
