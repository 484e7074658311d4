"""Limited keys while the store cannot be reached: 503 with retry-after by default, or with
`[limits] on_store_down = "share"` each gateway process admits on its own within its share of the limits (the
concurrency divided by the processes that held a lease); keys without limits are served throughout."""
from __future__ import annotations

import asyncio
import http.client
import json

import pytest

from apertis_proxy.store import service
from tests.ops import test_ledger_faults as faults
from tests.support.gateway_process import GatewayProcess
from tests.support.limits_load import MODEL, OpenStream, create_key, send, setup_store
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.pg_server import PgServer, PgUnavailable, memory_folder
from tests.support.processes import wait_for

SLOW = {"x-mock-scenario": "event-delay=0.1"}       # a stream in flight for about a second
# Haiku 4.5's output is $5 per million tokens: 32,000 of them reserve at least $0.16, more than a $0.10 quota.
COSTLY_BOUND = {"max_tokens": 32_000}


def body(n: int, stream: bool = False) -> dict:
    return {"model": MODEL, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": f"while the store is away {n}"}]}


async def test_limited_keys_refuse_or_share_while_the_store_is_away(pg_server, tmp_path):
    # pg_server: PostgreSQL is there (or the test skips, or fails in CI); this test stops a server of its own.
    try:
        server = await asyncio.to_thread(PgServer.start, True, memory_folder())     # a crash keeps what it committed
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


def fetch(db: str, sql: str) -> list:
    conn = service.connect(db)
    try:
        return [tuple(row) for row in conn.execute(sql).fetchall()]
    finally:
        conn.close()


async def wait_until(check, timeout: float, what: str):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value or loop.time() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        await asyncio.sleep(0.1)


async def test_share_mode_counts_a_request_of_unknown_usage_admitted_alone_at_its_bound(pg_server, tmp_path):
    """With `[limits] on_store_down = "share"`, a request admitted alone while the store is away holds no
    admission in the store; when its usage is unknown (its client left before the stream's head), its ledger row
    (cost NULL) has no admission to settle a bound from, so the keys plugin settles the bound it was admitted with
    into the key's spend once the store is back: the key ($0.10 quota, the cut request reserving $0.16) gets 402,
    as when the same request is cut while the store is up (test_ledger_usage_unknown.py)."""
    try:
        server = await asyncio.to_thread(PgServer.start, True, memory_folder())     # a crash keeps what it committed
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    host = None
    try:
        db = await asyncio.to_thread(server.create_database, "share")
        async with MockUpstream(api_key=MOCK_API_KEY) as mock:
            key = await asyncio.to_thread(faults.setup_store, db, mock, "--quota", "0.10")
            host = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw",
                                           tables={"limits": {"lease_seconds": 3, "on_store_down": "share"}})
            status, _, _ = await asyncio.to_thread(faults.post, host.port, key, faults.message())
            assert status == 200            # a lease and a decision of the store to share from
            await asyncio.to_thread(server.stop, "immediate")

            seen = len(mock.requests)
            conn = http.client.HTTPConnection("127.0.0.1", host.port, timeout=10)
            costly = faults.message(stream=True, **COSTLY_BOUND)
            conn.request("POST", "/v1/messages", body=json.dumps(costly).encode(),
                         headers={"content-type": "application/json", "anthropic-version": "2023-06-01",
                                  "x-api-key": key, "x-mock-scenario": "first-byte-delay=5"})

            async def upstream_has_it() -> bool:
                return len(mock.requests) > seen
            await wait_until(upstream_has_it, 10.0, "the costly request to reach the upstream (admitted alone)")
            conn.close()                    # the client leaves before the stream's head: usage unknown
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start_again)

            async def both_rows() -> bool:
                try:
                    return len(await asyncio.to_thread(faults.ledger_ids, db)) >= 2
                except Exception:  # noqa: BLE001 - the server is still starting
                    return False
            await wait_until(both_rows, 20.0, "the cut request's ledger row to be shipped")
            cut = await asyncio.to_thread(fetch, db, "SELECT cost, input_tokens, interrupted FROM usage"
                                                     " WHERE cost IS NULL")
            assert len(cut) == 1 and cut[0][2], f"no row of unknown usage: {cut}"
            await asyncio.sleep(1.5)

            async def answered() -> tuple:
                status, _, body = await asyncio.to_thread(faults.post, host.port, key, faults.message())
                return (status, body) if status not in (429, 503) else None
            status, body = await wait_until(answered, 20.0, "an answer from the store once it is back")
            assert status == 402, (f"a key past its quota by a request of unknown usage admitted alone was answered "
                                   f"{status}: the request counted $0, not its $0.16 bound")
    finally:
        if host is not None:
            await asyncio.to_thread(host.kill)
        await asyncio.to_thread(server.close)
