"""Tailing the event log: every state change, in order, from any event id."""

from __future__ import annotations

from collections.abc import Iterator

from factory.store import FINAL_RUN_STATUSES, Event, Store


def tail(
    store: Store,
    after_id: int = 0,
    run_id: str | None = None,
    follow: bool = False,
    poll_seconds: float = 0.2,
    batch: int = 1000,
) -> Iterator[Event]:
    """Yield events with id > ``after_id``. With ``follow``, keep waiting for new ones
    (PostgreSQL wakes the tailer on commit; SQLite is polled every ``poll_seconds``);
    when following one run, stop once that run has finished and its events are out."""
    last = after_id
    while True:
        page = store.events(last, run_id, batch)
        for event in page:
            last = event.id
            yield event
        if len(page) == batch:
            continue
        if not follow:
            return
        if run_id is not None and store.get_run(run_id).status in FINAL_RUN_STATUSES:
            page = store.events(last, run_id, batch)
            if not page:
                return
            continue
        store.wait_for_events(poll_seconds)
