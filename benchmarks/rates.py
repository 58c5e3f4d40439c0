"""The rates the scaling estimate of docs/cluster.md rests on, measured on this machine.

    python -m benchmarks.rates --store postgresql://... --events redis://... [--seconds 5]

- store: transactions/s of ``Store.record`` on that store, one step change per transaction
  (a coordinator that commits each finished step alone) and 20 per transaction (a sweep of
  ``ray.wait`` that finished several), from 1 and from 4 threads (4 coordinators);
- events: the events/s ``RedisEventPublisher`` moves from the store's event log to Redis
  Streams, and the events/s a reader gets back from Redis (``RedisEventBus.replay``);
- coordinator: steps/s of one coordinator process running a fan-out of ``--steps`` items
  of a trivial function on a local Ray, with that store and that Redis.

Give it a database of its own (its runs stay there) and any Redis (its keys live under the
new store's id). Prints one line per figure; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import ray

import factory
from benchmarks.engine import fanout_workflow
from factory.redisbus import RedisEventBus, RedisEventPublisher
from factory.settings import Settings, mask_secrets
from factory.store import Change, RunStatus, StepChange, StepStatus, Store, open_store


def _new_run(store: Store, steps: int) -> tuple[str, list[str]]:
    run_id = uuid.uuid4().hex[:12]
    step_ids = [f"s{i}" for i in range(steps)]
    store.create_run(run_id, "rates", "{}", {}, step_ids)
    return run_id, step_ids


def store_commits(url: str, threads: int, per_commit: int, seconds: float) -> dict[str, float]:
    """Transactions/s and step changes/s of Store.record from ``threads`` threads."""
    stores = [open_store(url, pool_max=1) for _ in range(threads)]
    counts = [0] * threads
    stop = threading.Event()

    def writer(index: int) -> None:
        store = stores[index]
        run_id, step_ids = _new_run(store, 1000)
        i = 0
        while not stop.is_set():
            changes: list[Change] = [
                StepChange(
                    run_id,
                    step_ids[(i + k) % len(step_ids)],
                    StepStatus.SUCCEEDED,
                    "step.succeeded",
                    attempts=1,
                    output_json=json.dumps({"value": i + k}),
                    attempt_logs="",
                    attempt_duration=0.001,
                )
                for k in range(per_commit)
            ]
            store.record(changes)
            i += per_commit
            counts[index] += 1

    workers = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(30)
    elapsed = time.perf_counter() - started
    for store in stores:
        store.close()
    commits = sum(counts)
    return {"commits_per_s": commits / elapsed, "step_changes_per_s": commits * per_commit / elapsed}


def redis_events(url: str, events_url: str, events: int) -> dict[str, float]:
    """Events/s from the store's log to Redis Streams, and back to a reader."""
    store = open_store(url)
    try:
        run_id, step_ids = _new_run(store, 100)
        done = 0
        while done < events:  # the events a coordinator would write: one per change
            batch = min(500, events - done)
            store.record(
                [
                    StepChange(run_id, step_ids[(done + k) % 100], StepStatus.RUNNING, "step.started")
                    for k in range(batch)
                ]
            )
            done += batch
        publisher = RedisEventPublisher(store, events_url, batch=500)
        backlog = store.last_event_id() - publisher.cursor()
        started = time.perf_counter()
        published = publisher.publish_pending()
        publish_s = time.perf_counter() - started
        bus = RedisEventBus.for_store(store, events_url)
        started = time.perf_counter()
        read, after = 0, 0
        while True:
            got = bus.replay(after, run_id, count=1000)
            if not got:
                break
            read += len(got)
            after = got[-1].id
        read_s = time.perf_counter() - started
        return {
            "published": float(published),
            "backlog": float(backlog),
            "published_per_s": published / publish_s,
            "read": float(read),
            "read_per_s": read / read_s,
        }
    finally:
        store.close()


def coordinator_steps(url: str, events_url: str, steps: int) -> dict[str, float]:
    """Steps/s of one coordinator running a fan-out of ``steps`` items (best of 3)."""
    store = open_store(url)
    settings = Settings(home=tempfile.mkdtemp(prefix="factory-rates-"), events_url=events_url)
    try:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        factory.run(fanout_workflow(50), store=store, settings=settings)  # warm up
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            result = factory.run(fanout_workflow(steps), store=store, settings=settings)
            best = min(best, time.perf_counter() - started)
            assert result.status == RunStatus.SUCCEEDED, result.error
        return {"steps": float(steps + 2), "seconds": best, "steps_per_s": (steps + 2) / best}
    finally:
        ray.shutdown()
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rates", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="postgresql://... (a database of its own)")
    parser.add_argument("--events", required=True, help="redis://...")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each store measurement runs")
    parser.add_argument("--events-count", type=int, default=20_000, help="events to publish and read back")
    parser.add_argument("--steps", type=int, default=2000, help="items of the coordinator's fan-out")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)

    results: dict[str, Any] = {"store": mask_secrets(args.store), "events": mask_secrets(args.events)}
    for threads in (1, 4):
        for per_commit in (1, 20):
            results[f"store_{threads}x{per_commit}"] = store_commits(args.store, threads, per_commit, args.seconds)
    results["redis"] = redis_events(args.store, args.events, args.events_count)
    results["coordinator"] = coordinator_steps(args.store, args.events, args.steps)
    if args.json:
        sys.stdout.write(json.dumps(results) + "\n")
        return 0
    print(f"store {results['store']}, events {results['events']}, {os.cpu_count()} cpus")
    for threads in (1, 4):
        for per_commit in (1, 20):
            r = results[f"store_{threads}x{per_commit}"]
            print(
                f"store.record, {threads} thread(s), {per_commit:>2} change(s) a transaction: "
                f"{r['commits_per_s']:8.0f} commits/s {r['step_changes_per_s']:8.0f} step changes/s"
            )
    r = results["redis"]
    print(
        f"redis: {r['published']:.0f} events published at {r['published_per_s']:.0f}/s, "
        f"{r['read']:.0f} read back at {r['read_per_s']:.0f}/s"
    )
    r = results["coordinator"]
    print(f"one coordinator: {r['steps']:.0f} steps in {r['seconds']:.2f}s = {r['steps_per_s']:.0f} steps/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
