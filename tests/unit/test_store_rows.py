"""A batch's step rows folded to one a step (factory.store.sql.fold_step_rows) leave the steps
table as the rows applied one by one do: checked with the store's own UPDATE statement on an
in-memory SQLite table, over random sequences of changes (PostgreSQL's one statement a table,
which needs the fold, is checked against SQLite in tests/integration/test_store_contract.py)."""

from __future__ import annotations

import sqlite3
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from factory.store import StepChange, StepStatus
from factory.store.sql import _UPDATE_STEP, _step_row, fold_step_rows

STEPS = ("a", "b", "c")


def _table(rows: list[tuple[Any, ...]], started: dict[str, float | None]) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE steps (run_id TEXT, step_id TEXT, status TEXT, attempts INTEGER NOT NULL DEFAULT 0,"
        " output_json TEXT, error TEXT, started_at REAL, finished_at REAL, cached BOOLEAN NOT NULL DEFAULT 0,"
        " PRIMARY KEY (run_id, step_id))"
    )
    db.executemany(
        "INSERT INTO steps (run_id, step_id, status, output_json, started_at) VALUES ('r', ?, 'pending', ?, ?)",
        [(step, f'"before {step}"', started[step]) for step in STEPS],
    )
    db.executemany(_UPDATE_STEP, rows)
    return db.execute("SELECT * FROM steps ORDER BY step_id").fetchall()


changes = st.lists(
    st.builds(
        StepChange,
        run_id=st.just("r"),
        step_id=st.sampled_from(STEPS),
        status=st.sampled_from(list(StepStatus)),
        event=st.just("step.changed"),
        attempts=st.none() | st.integers(1, 4),
        output_json=st.none() | st.sampled_from(['"x"', "[1]", "null"]),
        error=st.none() | st.just("boom"),
        cached=st.booleans(),
        at=st.floats(1.0, 100.0),
    ),
    max_size=14,
)


@settings(max_examples=400, deadline=None)
@given(changes=changes, started=st.fixed_dictionaries({s: st.none() | st.just(0.5) for s in STEPS}))
def test_folded_rows_leave_the_steps_as_the_rows_one_by_one_do(
    changes: list[StepChange], started: dict[str, float | None]
) -> None:
    rows = [_step_row(change, 0.0) for change in changes]
    folded = fold_step_rows(rows)
    assert len(folded) == len({change.step_id for change in changes})
    assert _table(folded, started) == _table(rows, started)


def test_a_wait_after_a_start_keeps_the_start_and_a_start_after_a_wait_replaces_it() -> None:
    def row(status: StepStatus, at: float) -> tuple[Any, ...]:
        return _step_row(StepChange("r", "a", status, "e", at=at), 0.0)

    started = {step: None for step in STEPS}
    for rows, expected in (
        ([row(StepStatus.RUNNING, 1.0), row(StepStatus.WAITING, 2.0)], 1.0),
        ([row(StepStatus.WAITING, 1.0), row(StepStatus.WAITING, 2.0)], 1.0),
        ([row(StepStatus.WAITING, 1.0), row(StepStatus.RUNNING, 2.0)], 2.0),
        ([row(StepStatus.SUCCEEDED, 1.0), row(StepStatus.WAITING, 2.0)], 2.0),
    ):
        (folded,) = fold_step_rows(rows)
        assert _table([folded], started)[0][6] == expected == _table(rows, started)[0][6]
