"""Each node's system metrics (CPU, memory, GPU utilisation and memory, disk, network) under the
training run, through MLflow's own monitor: one per node (its local rank 0), named
`system/node<i>-<host>/...` so nodes stay apart in one run. Rank 0 makes the run; the other
nodes learn its id by broadcast. GPU figures need `nvidia-ml-py` (the `gpu` extra)."""

from __future__ import annotations

import logging
import os
import socket

from train.distributed import broadcast_from_rank0

log = logging.getLogger(__name__)


def node_id() -> str:
    """node<i>-<host>: DeepSpeed's launcher says the node's index as CROSS_RANK."""
    return f"node{os.environ.get('CROSS_RANK', '0')}-{socket.gethostname()}"


def start_system_metrics(run_id: str | None, uri: str, interval_s: float, resumed: bool):
    """The node's monitor, started, or None (off, not this node's local rank 0, or no run yet:
    the server was away at the start). Collective: every rank calls it (the run id is
    broadcast)."""
    run_id = broadcast_from_rank0(run_id)
    if not interval_s or run_id is None or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=interval_s,
            resume_logging=resumed,
            node_id=node_id(),
            tracking_uri=uri,
        )
        monitor.start()
    except Exception as err:  # a convenience: training goes on without it
        log.warning("system metrics of %s not logged (%s)", node_id(), err)
        return None
    return monitor
