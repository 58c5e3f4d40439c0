"""Joining a Ray cluster, or starting a local one."""

from __future__ import annotations

import logging

import ray


def ensure_ray(address: str | None = None) -> None:
    """Use the Ray already initialised in this process, else the one ``address`` (or
    RAY_ADDRESS) names, else a running local cluster, else start a new local Ray."""
    if ray.is_initialized():
        return
    # Ray warns on every start that token authentication is on; that is the secure
    # default we want, not news for a CLI user, so keep it out of the progress display.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    options = {"logging_level": logging.WARNING, "log_to_driver": False, "include_dashboard": False}
    if address:
        ray.init(address=address, **options)  # type: ignore[arg-type]
        return
    try:
        ray.init(address="auto", **options)  # type: ignore[arg-type]
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(**options)  # type: ignore[arg-type]
