"""The upstream pool's bookkeeping: reuse order, the idle bound, trimming of stale connections; the connect
timeout."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from apertis_proxy.upstream.connection import UpstreamError
from apertis_proxy.upstream.pool import Origin, Pool


class FakeConn:
    """Stands in for UpstreamConnection where only the pool's bookkeeping is under test."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.closed = False
        self.idle_since = 0.0

    def recycle(self) -> bool:
        return not self.closed

    def loop_time(self) -> float:
        return self.clock[0]

    def close(self) -> None:
        self.closed = True


def make_pool(max_idle: int = 3, idle_timeout: float = 60.0) -> Pool:
    return Pool(Origin("http://127.0.0.1:9"), max_idle=max_idle, idle_timeout=idle_timeout,
                connect_timeout=1.0, ssl_context=None)


async def test_warmest_first_and_bounded():
    clock = [asyncio.get_running_loop().time()]     # the pool reads the loop's clock on acquire
    pool = make_pool(max_idle=3)
    conns = [FakeConn(clock) for _ in range(5)]
    for c in conns:
        pool.in_use += 1
        pool.release(c)
    assert pool.idle == 3 and [c.closed for c in conns] == [False] * 3 + [True] * 2   # over the bound: closed
    got, reused = await pool.acquire()
    assert got is conns[2] and reused                                               # most recently used first


async def test_stale_connections_are_trimmed_from_the_cold_end():
    clock = [0.0]
    pool = make_pool(max_idle=10, idle_timeout=60.0)
    old = [FakeConn(clock) for _ in range(3)]
    for c in old:
        pool.in_use += 1
        pool.release(c)
    old[1].closed = True                       # the upstream closed one meanwhile
    clock[0] = 100.0                           # the rest went stale
    fresh = [FakeConn(clock) for _ in range(3)]
    for c in fresh:
        pool.in_use += 1
        pool.release(c)                        # each release trims one from the cold end
    assert all(c.closed for c in old) and pool.idle == 3
    assert not any(c.closed for c in fresh)


async def test_connect_that_gets_no_answer_times_out():
    """A channel that never answers the handshake: a timeout error after connect_timeout, not a hang.  A
    listening socket whose accept queue is full drops further SYNs, which is such a channel on 127.0.0.1."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):      # fill the accept queue (backlog 0 admits one, kernels differ a little)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.1)
        pool = Pool(Origin(f"http://127.0.0.1:{port}"), max_idle=3, idle_timeout=60.0,
                    connect_timeout=0.3, ssl_context=None)
        started = time.monotonic()
        with pytest.raises(UpstreamError) as err:
            await pool.acquire()
        assert err.value.timeout and "timed out" in str(err.value), err.value
        assert 0.25 <= time.monotonic() - started < 3
    finally:
        for s in fillers:
            s.close()
        listener.close()
