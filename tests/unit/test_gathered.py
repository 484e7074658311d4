"""Calls gathered into batches (store/gathered.py): what goes together, and who gets which error."""
from __future__ import annotations

import asyncio

import pytest

from apertis_proxy.store.gathered import Gathered


class Refused(Exception):
    """Stands for an error the database reported: nothing of the batch stayed."""


class Server:
    """A fake send: records each batch, answers item * 10, refuses a batch holding a "bad" item, and loses the
    connection on a batch holding a "lost" item.  `gate`, when set, holds every batch until it is opened."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.gate: asyncio.Event | None = None

    async def send(self, items):
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if "lost" in items:
            raise ConnectionResetError("connection lost")
        if "bad" in items:
            raise Refused("refused")
        return [item * 10 for item in items]


def gathered(server: Server, in_flight: int = 2, most: int = 100, distinct=None) -> Gathered:
    return Gathered(server.send, (Refused,), in_flight, most, distinct)


async def test_calls_of_one_loop_iteration_go_as_one_batch_in_order():
    server = Server()
    calls = gathered(server)
    assert await asyncio.gather(*(calls.call(n) for n in range(5))) == [0, 10, 20, 30, 40]
    assert server.batches == [[0, 1, 2, 3, 4]]


async def test_a_refused_batch_is_sent_again_one_call_at_a_time_and_only_the_call_at_fault_fails():
    server = Server()
    calls = gathered(server)
    outcomes = await asyncio.gather(calls.call(1), calls.call("bad"), calls.call(3), return_exceptions=True)
    assert outcomes[0] == 10 and isinstance(outcomes[1], Refused) and outcomes[2] == 30
    assert server.batches == [[1, "bad", 3], [1], ["bad"], [3]]


async def test_any_other_error_goes_to_every_call_of_the_batch_and_nothing_is_sent_again():
    """The connection lost: the batch may have committed, so none of it is sent again."""
    server = Server()
    calls = gathered(server)
    outcomes = await asyncio.gather(calls.call(1), calls.call("lost"), calls.call(3), return_exceptions=True)
    assert all(isinstance(outcome, ConnectionResetError) for outcome in outcomes)
    assert server.batches == [[1, "lost", 3]]


async def test_calls_made_while_the_batches_are_out_wait_and_go_together():
    server = Server()
    server.gate = asyncio.Event()
    calls = gathered(server, in_flight=2)
    first = asyncio.gather(calls.call(1), calls.call(2))
    await asyncio.sleep(0.01)
    second = asyncio.gather(calls.call(3))
    await asyncio.sleep(0.01)
    third = asyncio.gather(*(calls.call(n) for n in (4, 5, 6)))
    await asyncio.sleep(0.01)
    assert server.batches == [[1, 2], [3]]          # two batches out: 4, 5 and 6 wait
    server.gate.set()
    assert (await first, await second, await third) == ([10, 20], [30], [40, 50, 60])
    assert server.batches == [[1, 2], [3], [4, 5, 6]]


async def test_a_batch_holds_at_most_most_calls_and_a_repeat_waits_for_the_next():
    server = Server()
    calls = gathered(server, most=3, distinct=lambda item: item)
    assert await asyncio.gather(*(calls.call(n) for n in (1, 2, 1, 3, 4))) == [10, 20, 10, 30, 40]
    assert server.batches == [[1, 2, 3], [1, 4]]


async def test_a_call_whose_caller_gave_up_before_it_went_is_not_sent():
    server = Server()
    calls = gathered(server)
    gone = asyncio.ensure_future(calls.call(1))
    kept = asyncio.ensure_future(calls.call(2))
    await asyncio.sleep(0)          # both calls wait; the batch task has not taken them yet
    gone.cancel()
    assert await kept == 20
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert server.batches == [[2]]


async def test_a_caller_that_gave_up_while_its_batch_was_out_is_not_sent_again_one_by_one():
    """A refused batch goes again call by call; a caller that left meanwhile (a client that disconnected) is not
    among them: an admission made for it now would hold a slot that nobody releases."""
    server = Server()
    server.gate = asyncio.Event()
    calls = gathered(server)
    first = asyncio.ensure_future(calls.call(1))
    gone = asyncio.ensure_future(calls.call("bad"))
    third = asyncio.ensure_future(calls.call(3))
    await asyncio.sleep(0.01)
    assert server.batches == [[1, "bad", 3]]
    gone.cancel()
    await asyncio.sleep(0)
    server.gate.set()
    assert (await first, await third) == (10, 30)
    assert server.batches == [[1, "bad", 3], [1], [3]]
