"""Limited keys while the store cannot be reached: 503 with retry-after by default, or with
`[limits] on_store_down = "share"` each gateway process admits on its own within its share of the limits (the
concurrency divided by the processes that held a lease); keys without limits are served throughout."""
from __future__ import annotations

import asyncio

import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.limits_load import MODEL, OpenStream, create_key, send, setup_store
from tests.support.mock_upstream import MockUpstream
from tests.support.pg_server import PgServer, PgUnavailable
from tests.support.processes import wait_for

SLOW = {"x-mock-scenario": "event-delay=0.1"}       # a stream in flight for about a second


def body(n: int, stream: bool = False) -> dict:
    return {"model": MODEL, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": f"while the store is away {n}"}]}


async def test_limited_keys_refuse_or_share_while_the_store_is_away(pg_server, tmp_path):
    # pg_server: PostgreSQL is there (or the test skips, or fails in CI); this test stops a server of its own.
    try:
        server = await asyncio.to_thread(PgServer.start)
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    hosts: list[GatewayProcess] = []
    try:
        db = await asyncio.to_thread(server.create_database, "away")
        async with MockUpstream() as mock:
            capped = await asyncio.to_thread(setup_store, db, mock, "capped", "--concurrency", "4")
            free = await asyncio.to_thread(create_key, db, "free")
            for name, mode in (("refusing", "refuse"), ("sharing", "share")):
                hosts.append(await asyncio.to_thread(
                    GatewayProcess.start, db, tmp_path / name,
                    tables={"limits": {"lease_seconds": 3, "on_store_down": mode}}))
            refusing, sharing = hosts
            for host in hosts:
                assert (await send(host.port, capped, body(0))).status == 200      # both hold a lease now

            await asyncio.to_thread(server.stop, "immediate")

            async def refused() -> bool:
                answer = await send(refusing.port, capped, body(1))
                assert answer.status in (200, 503), answer
                return answer.status == 503
            await wait_for(refused, 10.0, "the refusing host to answer 503 for a limited key")
            answer = await send(refusing.port, capped, body(2))
            assert answer.status == 503 and answer.error_type == "api_error", answer
            assert int(answer.headers["retry-after"]) >= 1
            for host in hosts:      # no limits, no store needed: served from the last snapshot
                assert (await send(host.port, free, body(3))).status == 200

            # The sharing host admits alone: its share of --concurrency 4 between two processes is 2.
            held = [await OpenStream.open(sharing.port, capped, body(4 + n, stream=True), SLOW) for n in range(2)]
            try:
                assert [s.status for s in held] == [200, 200]
                third = await send(sharing.port, capped, body(6))
                assert third.status == 429 and third.error_type == "rate_limit_error", third
                assert int(third.headers["retry-after"]) >= 1
            finally:
                finished = [await s.finish() for s in held]
            assert all(a.complete for a in finished)
            assert (await send(sharing.port, capped, body(7))).status == 200       # the share came back

            await asyncio.to_thread(server.start_again)

            async def admitted_again() -> bool:
                return (await send(refusing.port, capped, body(8))).status == 200
            await wait_for(admitted_again, 20.0, "the refusing host to admit once the store is back")
            assert len([r for r in mock.served if r["model"] == MODEL]) >= 6
    finally:
        for host in hosts:
            await asyncio.to_thread(host.stop)
        await asyncio.to_thread(server.close)
