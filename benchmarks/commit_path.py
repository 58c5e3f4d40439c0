"""The store's commit path alone: ``Store.record`` of batches like a coordinator's sweep.

    python -m benchmarks.commit_path [--store postgresql://...] [--seconds 3] [--label NAME]

For each batch size (1, 20 and 200 steps, each step a ``step.started`` and a
``step.succeeded`` change with its attempt, as the coordinator emits them), new runs are
created and claimed, and only the ``record()`` calls are timed, for ``--seconds``: the mean
time per call and per change. SQLite in a temporary folder always; ``--store`` also.

To compare two versions of the store, run it from each checkout (``PYTHONPATH=CHECKOUT``)
alternately, on the same machine, and compare the lines (``--label`` names them).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid

from factory.store import Change, StepChange, StepStatus, Store, open_store
from factory.store.sqlite import SQLiteStore

BATCHES = (1, 20, 200)
OWNER = "commit-path-benchmark"


def _changes(run_id: str, steps: list[str]) -> list[Change]:
    changes: list[Change] = []
    for step_id in steps:
        changes.append(StepChange(run_id, step_id, StepStatus.RUNNING, "step.started", attempts=1))
        changes.append(
            StepChange(
                run_id,
                step_id,
                StepStatus.SUCCEEDED,
                "step.succeeded",
                attempts=1,
                output_json="1",
                attempt_logs="",
                attempt_duration=0.001,
                data={"duration": 0.001},
            )
        )
    return changes


def time_record(store: Store, batch: int, seconds: float) -> tuple[float, int]:
    """Mean seconds per ``record()`` of ``batch`` steps, and how many calls were timed."""
    spent, calls = 0.0, 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        run_id = uuid.uuid4().hex[:12]
        steps = [f"s{i}" for i in range(batch)]
        store.create_run(run_id, "commit-path", "{}", {}, steps)
        store.claim_run(run_id, OWNER, 60)
        changes = _changes(run_id, steps)
        start = time.perf_counter()
        store.record(changes, owner=OWNER)
        spent += time.perf_counter() - start
        calls += 1
    return spent / max(calls, 1), calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="also this store, e.g. postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size and store")
    parser.add_argument("--label", default="", help="printed at the start of each line")
    args = parser.parse_args()
    stores: list[tuple[str, Store]] = [("sqlite", SQLiteStore(os.path.join(tempfile.mkdtemp(), "factory.db")))]
    if args.store:
        stores.append(("postgres" if args.store.startswith("postgres") else "store", open_store(args.store)))
    for name, store in stores:
        try:
            for batch in BATCHES:
                mean, calls = time_record(store, batch, args.seconds)
                one, five, _ = os.getloadavg()
                print(
                    f"{args.label}{' ' if args.label else ''}{name} batch of {batch} steps ({2 * batch} changes): "
                    f"{1e3 * mean:.3f} ms per record(), {1e6 * mean / (2 * batch):.1f} us per change "
                    f"({calls} calls); load {one:.1f}/{five:.1f}"
                )
        finally:
            store.close()


if __name__ == "__main__":
    main()
