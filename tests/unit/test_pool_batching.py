"""The caller's batcher without Ray: calls of one event-loop turn to one replica go as one actor
call, a lone call goes alone, parked calls are collected one by one, errors reach every caller."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from factory.pools.batching import Batcher
from factory.runtime import Outcome


class FakeMethod:
    def __init__(self, replica: FakeReplica, name: str) -> None:
        self.replica, self.name = replica, name

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replica.sent.append((self.name, args, future))
        return future


class FakeReplica:
    """An actor handle whose calls the test answers by hand."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self.call, self.call_batch, self.result, self.drop = (
            FakeMethod(self, n) for n in ("call", "call_batch", "result", "drop")
        )


def ok(text: str) -> Outcome:
    return Outcome(ok=True, output_json=f'"{text}"')


def args(task: Any) -> tuple[Any, None, None, None]:
    return (task, None, None, None)


def test_calls_of_one_turn_go_as_one_batch_and_a_parked_one_is_collected_alone() -> None:
    async def scenario() -> None:
        batcher = Batcher(asyncio.get_running_loop())
        replica, other = FakeReplica(), FakeReplica()
        futures = [batcher.send("r1", replica, args(i)) for i in range(3)]
        lone = batcher.send("r2", other, args("x"))
        await asyncio.sleep(0)  # the end of the turn
        assert [(name, sent) for name, sent, _ in replica.sent] == [("call_batch", ([args(0), args(1), args(2)],))]
        assert [(name, sent) for name, sent, _ in other.sent] == [("call", ("x",))]
        replica.sent[0][2].set_result([ok("a"), 7, ok("c")])  # the second was still running: token 7
        other.sent[0][2].set_result(ok("lone"))
        assert (await futures[0]).output_json == '"a"' and (await futures[2]).output_json == '"c"'
        assert (await lone).output_json == '"lone"'
        assert not futures[1].done()
        name, sent, parked = replica.sent[1]
        assert (name, sent) == ("result", (7,))
        parked.set_result(ok("b"))
        assert (await futures[1]).output_json == '"b"'
        assert batcher.actor_calls == 3  # one batch, one lone call, one collection

    asyncio.run(scenario())


def test_a_batch_is_split_at_max_batch() -> None:
    async def scenario() -> None:
        batcher = Batcher(asyncio.get_running_loop(), max_batch=4)
        replica = FakeReplica()
        for i in range(10):
            batcher.send("r1", replica, args(i))
        await asyncio.sleep(0)
        assert [len(sent[0]) if name == "call_batch" else 1 for name, sent, _ in replica.sent] == [4, 4, 2]

    asyncio.run(scenario())


def test_an_error_of_the_batch_reaches_every_caller() -> None:
    async def scenario() -> None:
        batcher = Batcher(asyncio.get_running_loop())
        replica = FakeReplica()
        futures = [batcher.send("r1", replica, args(i)) for i in range(2)]
        await asyncio.sleep(0)
        replica.sent[0][2].set_exception(ConnectionError("the replica died"))
        for future in futures:
            with pytest.raises(ConnectionError, match="replica died"):
                await future

    asyncio.run(scenario())


def test_a_caller_that_stopped_waiting_is_left_out_of_the_batch() -> None:
    async def scenario() -> None:
        batcher = Batcher(asyncio.get_running_loop())
        replica = FakeReplica()
        gone = batcher.send("r1", replica, args("gone"))
        kept = batcher.send("r1", replica, args("kept"))
        gone.cancel()
        await asyncio.sleep(0)
        assert [(name, sent) for name, sent, _ in replica.sent] == [("call", ("kept",))]
        replica.sent[0][2].set_result(ok("kept"))
        assert (await kept).output_json == '"kept"'

    asyncio.run(scenario())


def test_a_caller_that_stops_waiting_while_its_batch_runs_has_its_parked_call_dropped() -> None:
    async def scenario() -> None:
        batcher = Batcher(asyncio.get_running_loop())
        replica = FakeReplica()
        gone, kept = (batcher.send("r1", replica, args(i)) for i in ("gone", "kept"))
        await asyncio.sleep(0)
        gone.cancel()  # e.g. its run was cancelled while the batch ran
        replica.sent[0][2].set_result([5, ok("kept")])  # the first still running on the replica: token 5
        assert (await kept).output_json == '"kept"'
        assert [(name, sent) for name, sent, _ in replica.sent[1:]] == [("drop", (5,))]

    asyncio.run(scenario())
