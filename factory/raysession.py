"""Joining a Ray cluster, or starting a local one."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import ray

# `ray start` records the cluster it started here; ray.init() of another program does not.
RAY_START_RECORD = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def ensure_ray(address: str | None = None) -> None:
    """Use the Ray already initialised in this process; else the cluster ``address`` or
    RAY_ADDRESS names; else a cluster started with `ray start` on this machine; else a
    new local Ray (which lives as long as this process). Another program's private Ray
    (its own ray.init()) is never joined by accident."""
    if ray.is_initialized():
        return
    # Ray warns on every start that token authentication is on; that is the secure
    # default we want, not news for a CLI user, so keep it out of the progress display.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    options = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **options)  # type: ignore[arg-type]
        return
    if RAY_START_RECORD.exists():
        try:
            ray.init(address="auto", **options)  # type: ignore[arg-type]
            return
        except (ConnectionError, RuntimeError, ValueError):
            pass  # a stale record: that cluster is gone
    ray.init(address="local", include_dashboard=False, **options)  # type: ignore[arg-type]


def join_running_ray(address: str | None = None) -> bool:
    """Join the cluster ``address`` or RAY_ADDRESS names, or one `ray start` runs on this
    machine; never start a new Ray. True when this process is connected to one."""
    if ray.is_initialized():
        return True
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    target = address or os.environ.get("RAY_ADDRESS") or ("auto" if RAY_START_RECORD.exists() else None)
    if target is None:
        return False
    try:
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError):
        return False
    return True
