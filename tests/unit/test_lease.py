"""The lease keeper renews a run's lease from its thread only while the coordinator is blocked."""

from __future__ import annotations

import time
from typing import Any

from factory.lease import LeaseKeeper


class Beats:
    """A store's heartbeat, counted; it answers False once ``lost_after`` renewals were made."""

    def __init__(self, lost_after: int = 1_000) -> None:
        self.calls = 0
        self.lost_after = lost_after

    def heartbeat(self, run_id: str, owner: str) -> bool:
        self.calls += 1
        return self.calls <= self.lost_after


def keeper(store: Any) -> LeaseKeeper:
    return LeaseKeeper(store, "run-1", "me", interval=0.05)


def test_it_renews_only_while_blocked() -> None:
    store = Beats()
    lease = keeper(store)
    try:
        with lease.blocking():
            time.sleep(0.4)
        renewed = store.calls
        time.sleep(0.3)
        assert renewed >= 3 and store.calls == renewed  # nothing once the loop is back
        assert not lease.lost
    finally:
        lease.close()


def test_a_renewal_that_finds_another_owner_marks_the_lease_lost() -> None:
    store = Beats(lost_after=1)
    lease = keeper(store)
    try:
        with lease.blocking():
            time.sleep(0.4)
        assert lease.lost and store.calls == 2  # it stops renewing at once
    finally:
        lease.close()
