"""A pool slot is held by a lease and given back on every way out of an exchange: the lease's own bookkeeping,
and a real gateway whose relay fails at each stage (fault injection): the pool's counts are the same after the
failed request as before it, and the next request is served."""
from __future__ import annotations

import asyncio

import pytest

from apertis_proxy.gateway import forward, ownership, sse
from apertis_proxy.upstream.connection import UpstreamError
from apertis_proxy.upstream.pool import Origin, Pool
from tests.support.rawhttp import RawConnection

MODEL = "claude-haiku-4-5-20251001"


def ask(stream: bool) -> dict:
    return {"model": MODEL, "max_tokens": 16, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


class Fault(Exception):
    """A bug planted in the gateway: nothing in it catches this."""


def fail(*_args, **_kw):
    raise Fault("planted")


# Where the exchange breaks: the function that fails, the request, and the mock's scenario.
FAULTS = {
    "answer head": (forward, "downstream_headers", ask(stream=True), None),
    "first stream piece": (sse.SseSplicer, "feed", ask(stream=True), None),
    "json body": (ownership.StateCapture, "body", ask(stream=False), None),
    "upstream error body": (forward, "read_error", ask(stream=False), "status=529"),
}


async def post(env, body: dict, scenario: str | None = None) -> int:
    headers = {"x-api-key": env.key, **({"x-mock-scenario": scenario} if scenario else {})}
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        response = await conn.request("POST", "/v1/messages", headers, json_body=body)
        return response.status


@pytest.mark.parametrize("stage", FAULTS)
async def test_a_relay_that_fails_gives_its_connection_back(gateway, monkeypatch, stage):
    target, name, body, scenario = FAULTS[stage]
    assert await post(gateway, ask(stream=True)) == 200
    pools = gateway.gateway.pools
    pool = pools.pool(pools.origin(gateway.mock.base_url))
    assert (pool.in_use, pool.idle) == (0, 1)

    with monkeypatch.context() as patch:
        patch.setattr(target, name, fail)
        assert await post(gateway, body, scenario) == 500       # the handler's bug, answered
    # The handler's task may still be finishing its bookkeeping when the client has its answer.
    await gateway.usage_rows(n=2)

    assert pool.in_use == 0
    assert await post(gateway, ask(stream=False)) == 200
    assert pool.in_use == 0 and pool.idle == 1
    rows = await gateway.usage_rows(n=3)
    assert len(rows) == 3 and rows[0]["status"] == rows[2]["status"] == 200     # each metered once


class Conn:
    """Stands in for UpstreamConnection where only the lease's bookkeeping is under test: `answers` are what
    read_head() does, one per request (a status, or an UpstreamError to raise)."""

    def __init__(self, finished: bool = True, answers=(200, 200)) -> None:
        self.finished = finished
        self.answers = list(answers)
        self.closed = False
        self.idle_since = 0.0

    def send_request(self, *request) -> None:
        pass

    async def read_head(self, timeout: float):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def recycle(self) -> bool:
        return self.finished and not self.closed

    def loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def close(self) -> None:
        self.closed = True


def fake_pool(monkeypatch, conns: list[Conn]) -> Pool:
    pool = Pool(Origin("http://127.0.0.1:9"), max_idle=4, idle_timeout=60.0, connect_timeout=1.0, ssl_context=None)

    async def connect(loop):
        return conns.pop(0)

    monkeypatch.setattr(pool, "_connect", connect)
    return pool


async def send(lease) -> int:
    return await lease.send(b"POST", b"/v1/messages", [], b"{}", 5.0)


async def test_a_lease_keeps_a_finished_exchange_and_closes_the_rest(monkeypatch):
    done, cut, raised = Conn(), Conn(finished=False), Conn()
    pool = fake_pool(monkeypatch, [done, cut, raised])

    with pool.lease() as lease:
        assert await send(lease) == 200 and lease.conn is done and pool.in_use == 1
    assert (pool.in_use, pool.idle, done.closed) == (0, 1, False)       # idle, for the next request

    with pool.lease() as lease:
        assert await send(lease) == 200 and lease.conn is done and lease.reused
        done.finished = False                                           # its response is not read to the end
    assert (pool.in_use, pool.idle, done.closed) == (0, 0, True)

    with pool.lease() as lease:
        await send(lease)
    assert (pool.in_use, pool.idle, cut.closed) == (0, 0, True)

    with pytest.raises(Fault):
        with pool.lease() as lease:
            await send(lease)
            fail()
    assert (pool.in_use, pool.idle, raised.closed) == (0, 0, True)      # whatever the connection's state


async def test_a_reused_connection_the_upstream_closed_is_retried_once_on_a_fresh_one(monkeypatch):
    stale, fresh = Conn(answers=[200, UpstreamError("upstream closed the connection", "head")]), Conn()
    pool = fake_pool(monkeypatch, [stale, fresh])
    with pool.lease() as lease:
        await send(lease)                   # stale goes idle
    with pool.lease() as lease:
        assert await send(lease) == 200 and lease.conn is fresh and not lease.reused
        assert stale.closed and pool.in_use == 1
    assert (pool.in_use, pool.idle) == (0, 1)


async def test_a_failed_send_frees_its_slot(monkeypatch):
    broken = Conn(answers=[UpstreamError("upstream sent nothing for 5s", "head", timeout=True)])
    pool = fake_pool(monkeypatch, [broken])
    with pytest.raises(UpstreamError):
        with pool.lease() as lease:
            await send(lease)
    assert broken.closed and (pool.in_use, pool.idle) == (0, 0)


async def test_a_lease_that_never_connected_holds_nothing(monkeypatch):
    pool = fake_pool(monkeypatch, [])
    with pool.lease():
        pass
    assert pool.in_use == 0
