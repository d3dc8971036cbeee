"""Two "nodes" as Linux network namespaces joined by a veth pair, one deepspeed launcher per
node in its no-ssh mode, training one job together over TCP (docs/MULTINODE.md)."""

import json
import os
import shutil
import subprocess
import uuid

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.multirank import free_port
from tests.test_engine_e2e import launch, setup  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e
ADDRS = ("10.231.7.1", "10.231.7.2")


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) not installed: cannot make network namespaces")
    tag = uuid.uuid4().hex[:6]
    ns, veth = (f"covr{tag}a", f"covr{tag}b"), (f"cv{tag}a", f"cv{tag}b")
    made = _ip("netns", "add", ns[0])
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {made.stderr.strip()}")
    try:
        _ip("netns", "add", ns[1])
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, ADDRS):
            _ip("link", "set", v, "netns", n)
            _ip("-n", n, "addr", "add", f"{a}/24", "dev", v)
            _ip("-n", n, "link", "set", v, "up")
            _ip("-n", n, "link", "set", "lo", "up")
        ping = subprocess.run(
            ["ip", "netns", "exec", ns[0], "ping", "-c1", "-W2", ADDRS[1]], capture_output=True
        )
        if ping.returncode != 0 and shutil.which("ping"):
            pytest.skip("the veth link between the namespaces does not carry traffic")
        yield ns, veth
    finally:
        for n in ns:
            _ip("netns", "del", n)


def test_two_nodes_train_one_job_like_two_local_ranks(setup, two_nodes, tmp_path):  # noqa: F811
    (ns, veth), port = two_nodes, free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in ADDRS))
    out = tmp_path / "multinode"
    procs = []
    for rank, (n, v) in enumerate(zip(ns, veth)):
        cmd = [
            "ip",
            "netns",
            "exec",
            n,
            "env",
            f"GLOO_SOCKET_IFNAME={v}",
            "deepspeed",
            "--no_ssh",
            "--node_rank",
            str(rank),
            "--hostfile",
            str(hostfile),
            "--master_addr",
            ADDRS[0],
            "--master_port",
            str(port),
            str(ROOT / "launch/train.py"),
            "--config",
            str(setup),
            f"train.out_dir={out}",
            "deepspeed.zero_stage=3",
            "train.epochs=1",
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PDSH_RCMD_TYPE": "ssh"},
            )
        )
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(log[-3000:] for log in logs)
    summary = json.loads((out / "summary.json").read_text())
    local = launch(setup, tmp_path / "local", "deepspeed.zero_stage=3", "train.epochs=1")
    assert summary["steps"] == local["steps"] > 0
    a, b = (
        load_file(out / "export/model.safetensors"),
        load_file(tmp_path / "local/export/model.safetensors"),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
