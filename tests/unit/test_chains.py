"""The bookkeeping of chains in flight and of short for_each items (factory.chains,
factory.batches): pure, no Ray; the driver's use of them is tested in test_driver.py."""

from __future__ import annotations

from typing import Any

import pytest

from factory.batches import MAX_ITEMS_PER_TASK, ItemBatcher, items_per_task
from factory.chains import ChainBook
from factory.groups import StepTimes, plan
from factory.runtime import CallPart
from factory.scheduler import SubmitStep

pytestmark = pytest.mark.unit


def submit(token: int, step_id: str) -> SubmitStep:
    return SubmitStep(token, step_id)


def test_a_submission_waits_for_a_chain_step_and_goes_with_its_ref() -> None:
    book = ChainBook()
    book.add("stream", [submit(1, "a"), submit(2, "b")])
    book.wait([submit(3, "d")], {"b": None, "x": "ref-x"})
    assert book.pending("b") and book.pending("d")
    assert book.reported("stream", "a", "ref-a") == ([], [])
    [ready], [] = book.reported("stream", "b", "ref-b")
    assert ready.deps == {"b": "ref-b", "x": "ref-x"} and [a.step_id for a in ready.actions] == ["d"]
    assert not book.pending("b")


def test_a_submission_waiting_for_a_waiting_one_goes_after_it() -> None:
    """b runs in a chain; d waits for b; e (needing d) waits for d: it goes once d went."""
    book = ChainBook()
    book.add("stream", [submit(1, "a"), submit(2, "b")])
    book.wait([submit(3, "d")], {"b": None})
    book.wait([submit(4, "e")], {"d": None})
    [d], [] = book.reported("stream", "b", "ref-b")
    assert book.went(d, {"d": "ref-d"}, "not-run")[0][0].deps == {"d": "ref-d"}
    assert not book.pending("d")


def test_a_waiting_submission_that_goes_as_a_chain_makes_its_dependants_wait_for_that_chain() -> None:
    book = ChainBook()
    book.add("s1", [submit(1, "a"), submit(2, "b")])
    book.wait([submit(3, "d"), submit(4, "e")], {"b": None})
    book.wait([submit(5, "f")], {"e": None})
    [d], [] = book.reported("s1", "b", "ref-b")
    book.add("s2", d.actions)  # d and e went as one chain
    assert book.went(d, {}, "not-run") == ([], [])
    [f], [] = book.reported("s2", "e", "ref-e")
    assert f.deps == {"e": "ref-e"}


def test_when_a_chain_stops_early_what_waited_for_its_later_steps_will_not_go() -> None:
    book = ChainBook()
    book.add("stream", [submit(1, "a"), submit(2, "b"), submit(3, "c")])
    book.wait([submit(4, "d")], {"c": None})
    book.wait([submit(5, "e")], {"d": None})
    assert book.reported("stream", "a", "ref-a") == ([], [])
    book.chains["stream"].tokens.popleft()
    book.chains["stream"].step_ids.popleft()
    tokens, ready, dropped = book.end("stream", "not-run")  # b failed: b and c did not report
    assert tokens == [2, 3] and ready == [] and [a.step_id for w in dropped for a in w.actions] == ["d"]
    ready, gone = book.dropped(dropped[0], "not-run")
    assert ready == [] and [a.step_id for w in gone for a in w.actions] == ["e"]
    assert not book.pending("c") and not book.pending("d")


def test_a_step_sent_alone_again_is_no_longer_an_old_chains_to_report() -> None:
    book = ChainBook()
    book.add("old", [submit(1, "a"), submit(2, "b")])
    book.sent_alone("b")
    assert not book.pending("b")
    assert book.reported("old", "b", "stale") == ([], [])


def test_a_group_goes_even_when_a_step_it_needs_did_not_succeed_or_run() -> None:
    """A group waiting for a chain's step is given that step's result whether it succeeded or
    not (its steps that need it say so themselves, as tasks given it would); a plain submission
    waiting beside it will not go. A group waiting for a submission that will not go is given
    the result of a step that did not run."""
    book = ChainBook()
    book.add("stream", [submit(1, "a"), submit(2, "b")])
    book.wait([submit(3, "g1"), submit(4, "g2")], {"a": None, "x": "ref-x"}, group=True)
    book.wait([submit(5, "d")], {"a": None})
    book.wait([submit(6, "h1"), submit(7, "h2")], {"d": None}, group=True)
    [group], [plain] = book.reported("stream", "a", "failed-a", ok=False)
    assert group.deps == {"a": "failed-a", "x": "ref-x"} and [a.step_id for a in plain.actions] == ["d"]
    [after], gone = book.dropped(plain, "not-run")
    assert gone == [] and after.deps == {"d": "not-run"} and after.group
    tokens, ready, dropped = book.end("stream", "not-run")
    assert tokens == [1, 2] and ready == dropped == []


def test_a_steps_latest_submission_is_the_one_its_dependants_wait_for() -> None:
    """b went in an old group, then was submitted again (its dependency retried) and waits: a
    dependant submitted now waits for the new b, not the old group's (whose b no longer counts);
    and once the new b goes in a group of its own, the old group's report of b binds nothing."""
    book = ChainBook()
    book.add("old", [submit(1, "a"), submit(2, "b")], group=True)
    book.add("x", [submit(3, "x"), submit(4, "y")])
    book.wait([submit(5, "b")], {"y": None})  # b again, waiting for y of chain x
    book.wait([submit(6, "d")], {"b": None})
    assert book.reported("old", "b", "stale-b") == ([], [])  # nothing waits there
    [b], [] = book.reported("x", "y", "ref-y")
    book.add("new", b.actions, group=True)
    assert book.went(b, {}, "not-run") == ([], [])
    assert book.reported("old", "b", "stale-b") == ([], [])
    [d], [] = book.reported("new", "b", "ref-b")
    assert d.deps == {"b": "ref-b"}


def test_a_group_that_goes_with_a_step_that_no_longer_counts_leaves_that_step_to_its_newer_submission() -> None:
    """Group [p, q] waited for z; q's attempt stopped counting meanwhile (a dependency retried)
    and q went again alone. The group goes with p only claimed: what waited for the old q is
    told it did not run (a step is dropped, a group given ``not_run``), and q stays the newer
    submission's (the group's stream does not report it)."""
    book = ChainBook()
    book.add("g0", [submit(1, "y"), submit(2, "z")], group=True)
    waiting = waiting_group(book, [submit(3, "p"), submit(4, "q")], {"z": None})
    book.wait([submit(5, "r")], {"q": None})  # r, submitted against the old q
    book.wait([submit(6, "g1"), submit(7, "g2")], {"q": None}, group=True)
    book.sent_alone("q")  # q again, alone (the driver's refs hold its new result)
    [ready], [] = book.reported("g0", "z", "ref-z")
    assert ready is waiting
    book.add("gw", waiting.actions, group=True, claimed={"p"})
    assert book.pending_in.get("p") == "gw" and "q" not in book.pending_in
    more, gone = book.went(waiting, {"q": "new-q"}, "not-run", claimed={"p"})
    assert [w.actions[0].step_id for w in gone] == ["r"]
    assert [w.actions[0].step_id for w in more] == ["g1"] and more[0].deps == {"q": "not-run"}
    assert book.reported("gw", "q", "stale-q", ok=False) == ([], [])


def waiting_group(book: ChainBook, actions: list[SubmitStep], deps: dict[str, object]) -> Any:
    """The waiting submission ``book.wait`` made of ``actions`` (a group)."""
    book.wait(actions, deps, group=True)
    return book.parked[actions[0].step_id]


def test_a_group_is_laid_out_with_what_it_is_given_and_where_each_step_finds_its_dependencies() -> None:
    deps = {"a": ["x"], "b": ["a", "y"], "c": ["b", "x", "a"], "x": [], "y": []}
    given, sources = plan(["a", "b", "c"], deps)
    assert given == ["x", "y"]
    assert sources == [(~0,), (0, ~1), (1, ~0, 0)]
    with pytest.raises(ValueError, match="comes before"):
        plan(["b", "a"], deps)


def test_step_times_are_the_median_of_recent_attempts_and_only_short_ones_count() -> None:
    times = StepTimes(capacity=2)
    assert times.short("m:f") is None  # never seen
    for seconds in (0.0002, 0.05, 0.0003):  # one slow attempt (a first import) does not decide
        times.learn("m:f", seconds)
    assert times.short("m:f") == 0.0003
    for seconds in (0.2, 0.3, 0.4):  # it became long: three of five say so
        times.learn("m:f", seconds)
    assert times.short("m:f") is None
    for _ in range(5):
        times.learn("m:f", 0.0001)  # short again
    assert times.short("m:f") == 0.0001
    times.learn("m:g", 0.0001)
    times.learn("m:h", 0.0001)  # over capacity: the function seen least recently is forgotten
    assert not times.known("m:f") and times.short("m:g") == times.short("m:h") == 0.0001
    times.learn("m:g", 0.0001)
    times.learn("m:i", 0.0001)
    assert times.short("m:h") is None and times.short("m:g") == 0.0001


def test_items_per_task_aims_at_a_short_task_and_is_bounded() -> None:
    assert items_per_task(0.0001) == MAX_ITEMS_PER_TASK
    assert items_per_task(0.002) == 10
    assert items_per_task(0.5) == 1
    assert items_per_task(0.0) == 1  # no time known: one per task


def test_items_are_probed_then_held_until_an_items_time_is_known() -> None:
    batcher = ItemBatcher(probe=2)
    part = CallPart(arguments={})
    assert batcher.take("fan", 1, part) and batcher.take("fan", 2, part)
    assert not any(batcher.take("fan", t, part) for t in range(3, 30))
    assert batcher.ready() == []  # nothing known yet
    assert batcher.drop(5) and not batcher.drop(5)
    batcher.learn("fan", 0.002)  # 10 a task
    tasks = batcher.ready()
    assert [len(items) for _, items in tasks] == [10, 10, 6]
    assert [t for _, items in tasks for t, _ in items] == [t for t in range(3, 30) if t != 5]
    assert batcher.take("other", 1, part)  # another step is probed on its own


def test_a_slower_item_makes_later_tasks_smaller_never_larger() -> None:
    batcher = ItemBatcher(probe=1)
    part = CallPart(arguments={})
    assert batcher.take("fan", 1, part)
    for token in range(2, 200):
        batcher.take("fan", token, part)
    batcher.learn("fan", 0.0001)  # quick: as many a task as allowed
    assert [len(items) for _, items in batcher.ready()][:2] == [MAX_ITEMS_PER_TASK] * 2
    batcher.learn("fan", 0.005)  # then one took 50 times longer: 4 a task from now on
    batcher.learn("fan", 0.0001)  # a quick one again does not make them larger
    batcher.hold_again("fan", [(t, part) for t in range(500, 512)])
    assert [len(items) for _, items in batcher.ready()] == [4, 4, 4]


def test_the_items_that_go_at_once_are_spread_over_as_many_tasks_as_were_probed() -> None:
    batcher = ItemBatcher(probe=4)
    part = CallPart(arguments={})
    assert all(batcher.take("fan", t, part) for t in range(4))
    assert not any(batcher.take("fan", t, part) for t in range(4, 24))
    batcher.learn("fan", 0.0001)  # 64 a task would put all 20 on one worker
    assert [len(items) for _, items in batcher.ready()] == [5, 5, 5, 5]


def test_slow_items_or_a_dead_worker_go_one_per_task() -> None:
    batcher = ItemBatcher(probe=1)
    part = CallPart(arguments={})
    assert batcher.take("slow", 1, part)
    assert not batcher.take("slow", 2, part)
    batcher.learn("slow", None)  # its worker died: nothing learnt, one per task
    assert [len(items) for _, items in batcher.ready()] == [1]
    assert batcher.take("slow", 3, part)
