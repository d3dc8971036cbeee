"""Where our processes listen: a local process group and a local Ray bind 127.0.0.1 only; a
process without a launcher is a world of one."""

import json
import os
from pathlib import Path

import psutil
import pytest

from sharding.local_ray import ray_init
from tests.multirank import in_fresh_process, run_ranks
from train import network


def listening(pids) -> list[str]:
    """Addresses (ip) of the TCP sockets the processes `pids` listen on."""
    return [
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _group(rank, world, out_dir):
    import torch.distributed as dist

    from train.engine import init_distributed

    assert init_distributed(60)[:2] == (rank, world)
    dist.barrier()  # every rank connected: the store and the gloo pairs are up
    Path(out_dir, f"listen{rank}.json").write_text(json.dumps(listening({os.getpid()})))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.e2e
def test_local_process_group_listens_on_loopback_only(tmp_path):
    shm = lambda: set(Path("/dev/shm").glob("deepspeed_allreduce_buffer*"))  # noqa: E731
    before = shm()
    run_ranks(_group, 2, (str(tmp_path),))
    # DeepSpeed's CPU shm all-reduce (not built: skip_cpu_shm_build) never unlinked its 66 MB
    # buffers: 265 of them had filled 17 GiB of this machine's /dev/shm
    assert shm() == before
    ips = [ip for r in (0, 1) for ip in json.loads((tmp_path / f"listen{r}.json").read_text())]
    assert ips and all(loopback(ip) for ip in ips), ips


def _finish_and_leave(rank, world, out_dir):
    import sys

    import torch.distributed as dist

    from train.engine import init_distributed

    sys.path.append(str(Path(__file__).resolve().parent.parent / "launch"))  # after the packages
    from _bootstrap import leave_process_group

    init_distributed(60)
    leave_process_group()
    Path(out_dir, f"left{rank}").write_text(str(dist.is_initialized()))


@pytest.mark.e2e
def test_finished_ranks_leave_their_process_group_together(tmp_path):
    run_ranks(_finish_and_leave, 2, (str(tmp_path),))
    assert [(tmp_path / f"left{r}").read_text() for r in (0, 1)] == ["False", "False"]


def _start_beside_a_stale_build_lock(rank, world, ext_dir):
    import faulthandler

    import torch.distributed as dist

    from train.engine import init_distributed

    faulthandler.dump_traceback_later(120, exit=True)  # a wait on the lock fails, not hangs
    os.environ["TORCH_EXTENSIONS_DIR"] = ext_dir
    init_distributed(60)
    dist.destroy_process_group()


@pytest.mark.e2e
def test_cpu_ranks_start_beside_a_stale_deepspeed_build_lock(tmp_path):
    """A process killed while DeepSpeed JIT-built its CPU shared-memory op leaves `lock`
    behind, and every later start waited on it forever (CI hung this way): nothing is built."""
    stale = tmp_path / "deepspeed_shm_comm"
    stale.mkdir()
    (stale / "lock").touch()
    run_ranks(_start_beside_a_stale_build_lock, 1, (str(tmp_path),))
    assert [p.name for p in stale.iterdir()] == ["lock"]


def _local_ray_addresses() -> list[str]:
    import ray

    ray_init(None, num_cpus=1, log_to_driver=False)
    try:
        assert ray.get(ray.remote(lambda: os.getpid()).remote()) > 0  # a worker is up too
        me = psutil.Process()
        return listening({me.pid} | {p.pid for p in me.children(recursive=True)})
    finally:
        ray.shutdown()


@pytest.mark.e2e
def test_local_ray_listens_on_loopback_only():
    ips = in_fresh_process(_local_ray_addresses)
    assert len(ips) >= 3 and all(loopback(ip) for ip in ips), ips  # GCS, raylet, worker, ...


def test_world_of_one_env_fills_only_what_is_missing(monkeypatch):
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
    ):
        monkeypatch.delenv(key, raising=False)
    assert network.world_of_one_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == (
        "0",
        "1",
        "127.0.0.1",
    )
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("WORLD_SIZE", "4")  # a launcher's world: left alone
    monkeypatch.delenv("RANK")
    assert not network.world_of_one_env() and "RANK" not in os.environ
