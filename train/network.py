"""Where our processes listen. A job on one machine binds its rendezvous (torch's TCPStore, the
gloo / NCCL sockets) to 127.0.0.1; a multi-node job uses the addresses given. (A local Ray:
sharding.local_ray, below this package.)"""

from __future__ import annotations

import os
import socket
import subprocess

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_listeners: list[socket.socket] = []  # the store's listening socket lives as long as the process


def free_port() -> int:
    """A TCP port free on this machine now (each local launch gets its own rendezvous port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(
    script, ranks: int, *args, port: int | None = None, launcher=("deepspeed",)
) -> list[str]:
    """The local launch of `script` on `ranks` processes by DeepSpeed's launcher (`launcher`:
    its console script, or `python -m deepspeed.launcher.runner`), each launch on its own
    rendezvous port (`port`, else a free one), then the script's `args`."""
    port = port or free_port()
    head = [*launcher, "--num_accelerators", str(ranks), "--master_port", str(port)]
    return [*head, str(script), *map(str, args)]


def start_job(cmd: list[str], cwd, **kwargs) -> subprocess.Popen:
    """A launcher command in its own session (the whole job can be signalled at once), its
    console captured as text."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def is_loopback(host: str | None) -> bool:
    return (host or "").strip("[]") in LOOPBACK


def world_of_one_env() -> bool:
    """A process started without a launcher (no WORLD_SIZE, no MPI) is a world of one: fill in
    the variables a launcher would set, so DeepSpeed does not go looking for MPI (mpi4py).
    Returns whether it did."""
    launched = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    if launched or os.environ.get("WORLD_SIZE", "1") != "1":
        return False
    defaults = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    missing = {k: v for k, v in defaults.items() if k not in os.environ}
    if "MASTER_PORT" not in os.environ:
        missing["MASTER_PORT"] = str(free_port())
    os.environ.update(missing)
    return bool(missing)


def init_loopback_process_group(backend: str, timeout) -> None:
    """torch.distributed on one machine, listening on 127.0.0.1 only. torch's TCPStore binds
    the master port on every interface; here rank 0 binds it on the loopback address itself
    and hands the socket over. gloo / NCCL pick their interface from *_SOCKET_IFNAME."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    port = int(os.environ["MASTER_PORT"])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    fd = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        _listeners.append(sock)
        fd = sock.fileno()
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout, master_listen_fd=fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
