"""Keeping a run's lease while the coordinator waits on something slow.

A coordinator renews its run's lease from its own loop (``Settings.heartbeat_seconds``), so a
coordinator whose loop stops, stops renewing, and another one may take the run over. Some calls
the loop makes may legitimately take longer than the lease: sending the first task to an agent
pool starts the pool's replicas (up to the pool manager's ``start_timeout``), and a route step
may first load the router's model. While the loop is inside such a call, a :class:`LeaseKeeper`
renews the lease from a thread of its own, so the run is not taken over from a live
coordinator (which would then stop, and its attempts in flight be run again).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from factory.store import Store

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews ``run_id``'s lease every ``interval`` seconds while the caller is inside :meth:`blocking`."""

    def __init__(self, store: Store, run_id: str, owner: str, interval: float) -> None:
        self.store = store
        self.run_id = run_id
        self.owner = owner
        self.interval = interval
        self.lost = False  # a renewal found another owner: the caller must stop
        self.renewals = 0
        self._since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """Around a call that may take longer than the lease."""
        if self._thread is None:  # started on first use: most runs never need it
            self._thread = threading.Thread(target=self._renew, name=f"lease-{self.run_id}", daemon=True)
            self._thread.start()
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            since = self._since
            if since is None or time.monotonic() - since < self.interval:
                continue
            try:
                renewed = self.store.heartbeat(self.run_id, self.owner)
            except Exception as exc:  # noqa: BLE001 - the store may be back at the next turn
                log.warning("cannot renew the lease of run %s: %s", self.run_id, exc)
                continue
            self.renewals += 1
            if not renewed:
                self.lost = True
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
