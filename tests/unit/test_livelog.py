"""A step's live log lines (step.log events) on a real SQLite store, and run_attempt's use of them, without Ray."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from factory.livelog import MAX_LINE_CHARS, MAX_LINES_PER_PUBLISH, LiveLog
from factory.runtime import Outcome, StepCall, run_attempt
from factory.spec import RetryPolicy
from factory.store import Store
from factory.store.sqlite import SQLiteStore

FIXTURES = str(Path(__file__).parent.parent / "fixtures")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = SQLiteStore(tmp_path / "state.db")
    s.create_run("r1", "wf", "{}", {}, ["a"])
    return s


def log_events(store: Store) -> list[dict[str, object]]:
    return [e.data for e in store.events(0, "r1") if e.type == "step.log"]


def lines_of(store: Store) -> list[str]:
    return [str(line) for data in log_events(store) for line in data["lines"]]  # type: ignore[attr-defined]


def wait_for(predicate: object, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_held_log_publishes_once_its_interval_passed_then_the_rest_at_the_end(store: Store) -> None:
    live = LiveLog(store.url, "r1", "a", interval=0.1, base={"attempt": 2, "item": 5}, hold_short=True)
    live.write("first\nsecond\npart")
    assert wait_for(lambda: lines_of(store) == ["first", "second"])  # the partial line waits for its end
    live.write("ial\nlast")
    live.flush_events(final=True)
    assert lines_of(store) == ["first", "second", "partial", "last"]
    assert all(d["attempt"] == 2 and d["item"] == 5 for d in log_events(store))
    assert live.getvalue() == "first\nsecond\npartial\nlast"  # the attempt's log keeps everything
    live.write("after the end\n")
    time.sleep(0.3)
    assert lines_of(store)[-1] == "last"  # nothing once it ended


def test_held_log_of_an_attempt_that_ends_before_the_interval_publishes_nothing(store: Store) -> None:
    live = LiveLog(store.url, "r1", "a", interval=0.5, hold_short=True)
    live.write("quick\n")
    live.flush_events(final=True)
    time.sleep(0.8)  # past the interval: the scheduled publication finds the log ended
    assert log_events(store) == []
    assert live.getvalue() == "quick\n"


def test_a_container_log_publishes_even_when_short(store: Store) -> None:
    live = LiveLog(store.url, "r1", "a", interval=5.0)
    live.write("one\ntwo")
    live.flush_events(final=True)
    assert lines_of(store) == ["one", "two"]


def test_a_log_that_got_nothing_publishes_nothing(store: Store) -> None:
    live = LiveLog(store.url, "r1", "a", interval=0.05)
    live.flush_events(final=True)
    assert log_events(store) == []


def test_a_flood_is_bounded_per_publication(store: Store) -> None:
    live = LiveLog(store.url, "r1", "a", interval=5.0)
    total = MAX_LINES_PER_PUBLISH + 150
    live.write("".join(f"n{i}\n" for i in range(total - 1)) + "y" * (MAX_LINE_CHARS + 10) + "\n")
    live.flush_events(final=True)
    lines = lines_of(store)
    assert len(lines) == MAX_LINES_PER_PUBLISH
    assert lines[0] == "n150"  # the newest lines; the others are counted
    assert log_events(store)[0]["skipped"] == 150
    assert lines[-1] == "y" * MAX_LINE_CHARS + " [cut]"
    assert all(len(d["lines"]) <= 200 for d in log_events(store))  # type: ignore[arg-type]


def python_call(store: Store, lines: int, pause: float) -> StepCall:
    return StepCall(
        step_id="a",
        target="teststeps:drip",
        arguments={"lines": lines, "pause": pause},
        resolved=True,
        inputs={},
        dep_ids=(),
        search_path=(FIXTURES,),
        timeout=None,
        retry=RetryPolicy(),
        store_url=store.url,
        run_id="r1",
        attempt=3,
    )


def test_a_python_step_running_past_the_interval_streams_its_lines_before_it_ends(store: Store) -> None:
    outcomes: list[Outcome] = []
    runner = threading.Thread(target=lambda: outcomes.append(run_attempt(python_call(store, 5, 0.3), ())))
    runner.start()
    seen_while_running: list[str] = []
    while runner.is_alive():
        if not outcomes and lines_of(store):
            seen_while_running = lines_of(store)
        time.sleep(0.05)
    runner.join()
    assert outcomes[0].ok, outcomes[0].error
    assert "line 0" in seen_while_running and "line 4" not in seen_while_running
    assert lines_of(store) == [f"line {i}" for i in range(5)]  # the last ones when it ended, each once
    assert {d["attempt"] for d in log_events(store)} == {3}
    assert "line 4" in outcomes[0].logs


def test_a_quick_python_step_publishes_no_log_events(store: Store) -> None:
    outcome = run_attempt(python_call(store, 3, 0.0), ())
    assert outcome.ok and outcome.logs == "line 0\nline 1\nline 2\n"
    time.sleep(0.8)
    assert log_events(store) == []
