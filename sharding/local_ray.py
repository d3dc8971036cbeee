"""Ray for packing and sweeps: a cluster at an address, or a Ray on this machine that listens
on 127.0.0.1 only (here, the lowest package that starts Ray; tune uses it too)."""

from __future__ import annotations


def ray_init(address: str | None = None, **kwargs):
    """Join the Ray cluster at `address`, or start a local Ray whose servers (GCS, raylet,
    workers, agents) listen on 127.0.0.1 only and without the dashboard. Ray binds its servers
    to the node IP; it takes the loopback address as the node IP when multi-node clusters are
    off (its macOS / Windows default), which is what a local Ray is."""
    import ray

    if address:
        return ray.init(address=address, **kwargs)
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when the node IP is chosen, at start-up
    try:
        return ray.init(include_dashboard=False, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
