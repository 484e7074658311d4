"""Calls gathered while the event loop runs, sent to the database together.

A `Gathered` takes calls of one kind (an item each, answered through a future of its own).  One loop
iteration after a call, every call waiting goes as one batch through `send(items)`, which returns one
outcome per item, in order.  At most `in_flight` batches are out at once; calls made meanwhile wait and go
together as the next batch, so a batch grows with the load instead of the round trips.

A batch the database refused (an error it reported: its transaction rolled back, nothing of it stays) is
sent again one call at a time, in order, so that only a call at fault fails and the others get what they
would have got alone.  Any other error (the connection lost, no answer in time: the batch may have
committed) goes to every call of the batch, as it would have gone to each call sent alone.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Hashable, Optional, Sequence

Send = Callable[[Sequence], Awaitable[Sequence]]


class Gathered:
    def __init__(self, send: Send, refused: tuple[type[BaseException], ...], in_flight: int, most: int,
                 distinct: Optional[Callable[[object], Hashable]] = None) -> None:
        self._send = send
        self._refused = refused             # errors after which nothing of a batch stays
        self._in_flight = in_flight
        self._most = most                   # calls per batch
        self._distinct = distinct           # calls of one batch differ in this (a repeat waits for the next)
        self._waiting: list[tuple[object, asyncio.Future]] = []
        self._out = 0
        self._starting = False              # a batch task started that has not taken its calls yet
        self._tasks: set[asyncio.Task] = set()

    async def call(self, item):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((item, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        """Start a batch task when calls wait and a batch may go out: its first step runs in the loop's next
        iteration, after every call made in this one."""
        if not self._starting and self._waiting and self._out < self._in_flight:
            self._starting = True
            self._out += 1
            task = asyncio.get_running_loop().create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list:
        """The next batch: the calls waiting whose callers still wait, in order, up to `most`, a call
        repeating one of the batch left for the next."""
        batch, rest, seen = [], [], set()
        for entry in self._waiting:
            if entry[1].done():
                continue                    # its caller gave up before it was sent
            key = None if self._distinct is None else self._distinct(entry[0])
            if len(batch) >= self._most or (key is not None and key in seen):
                rest.append(entry)
                continue
            seen.add(key)
            batch.append(entry)
        self._waiting = rest
        return batch

    async def _run(self) -> None:
        self._starting = False
        batch = self._take()
        try:
            if batch:
                await self._send_batch(batch)
        finally:
            self._out -= 1
            self._schedule()

    async def _send_batch(self, batch: list) -> None:
        try:
            try:
                outcomes = await self._send([item for item, _ in batch])
            except self._refused:
                if len(batch) == 1:
                    raise
                await self._one_by_one(batch)
                return
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                _answer(future, outcome, None)
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets it; none waits forever
            for _, future in batch:
                _answer(future, None, exc)
            if not isinstance(exc, Exception):
                raise

    async def _one_by_one(self, batch: list) -> None:
        for item, future in batch:
            if future.done():
                continue        # its caller gave up while the batch was out: an admission now would be nobody's
            try:
                outcome = (await self._send([item]))[0]
            except Exception as exc:  # noqa: BLE001 - that call's caller gets it; the next ones go on
                _answer(future, None, exc)
            else:
                _answer(future, outcome, None)

    async def close(self) -> None:
        """Calls not sent yet fail; batches out are waited for."""
        waiting, self._waiting = self._waiting, []
        for _, future in waiting:
            _answer(future, None, RuntimeError("the admissions store is closed"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _answer(future: asyncio.Future, outcome, exc: Optional[BaseException]) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(outcome)
    elif isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
