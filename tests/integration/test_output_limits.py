"""The max_output_bytes setting through the engine on a real Ray: a step, a for_each item, and
the list of a for_each's outputs that are each small enough but too big together."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import factory
from factory.settings import Settings
from factory.spec import RetryPolicy, Step, Workflow
from factory.store import RunStatus
from factory.store.sqlite import SQLiteStore

FIXTURES = str(Path(__file__).parent.parent / "fixtures")

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(120)]


@pytest.fixture
def store(factory_home: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(factory_home / "factory.db")
    yield s
    s.close()


def run(store: SQLiteStore, factory_home: Path, *steps: Step) -> factory.RunResult:
    settings = Settings(home=factory_home, max_output_bytes=2048)
    return factory.run(Workflow(name="t", steps=list(steps), base_dir=FIXTURES), store=store, settings=settings)


def test_a_large_output_fails_the_step_without_retry(store: SQLiteStore, factory_home: Path) -> None:
    big = Step(id="big", python="teststeps:echo", with_={"value": "x" * 3000}, retry=RetryPolicy(max_attempts=3))
    result = run(store, factory_home, big)
    assert result.status == RunStatus.FAILED
    error = result.error or ""
    assert "OutputTooLargeError" in error and "2048 bytes" in error and "max_output_bytes" in error
    assert "not retried" in error
    assert store.get_steps(result.run_id)[0].attempts == 1


def test_for_each_items_and_their_list(store: SQLiteStore, factory_home: Path) -> None:
    item_too_big = Step(
        id="each", python="teststeps:echo", for_each=["x" * 3000], with_={"value": "${item}"}, retry=RetryPolicy()
    )
    result = run(store, factory_home, item_too_big)
    assert result.status == RunStatus.FAILED and "item 0: OutputTooLargeError" in (result.error or "")

    together = Step(id="each", python="teststeps:echo", for_each=["x" * 1500] * 2, with_={"value": "${item}"})
    result = run(store, factory_home, together)
    assert result.status == RunStatus.FAILED
    assert "the list of its items' outputs is" in (result.error or "")

    fits = Step(id="each", python="teststeps:echo", for_each=["x" * 500] * 2, with_={"value": "${item}"})
    result = run(store, factory_home, fits)
    assert result.status == RunStatus.SUCCEEDED and result.outputs["each"] == ["x" * 500] * 2
