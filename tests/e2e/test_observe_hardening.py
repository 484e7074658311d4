"""Observability hardening through a real server: the client behind trusted proxies, attempt labels,
readiness during shutdown, and scrapes that agree across workers.  Each docstring says what could go wrong and
the behaviour that prevents it."""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from apertis_proxy.store import service as store_service
from tests.support.gateway_env import GatewayEnv
from tests.support.metrics import parse, scrape_samples, total, value
from tests.support.processes import MODEL, ServeProcess, wait_for
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.served_gateway import DRAIN_TIMEOUT, configured_server
from tests.support.workers import TCP_ESTABLISHED, crash_and_replace, listening_workers, sockets_of


async def test_a_request_refused_from_its_head_is_logged_with_the_forwarded_client(tmp_path, mock_upstream):
    """Behind a trusted proxy, a request refused from its head alone (a key no auth plugin admits, the body
    not sent yet) is logged with the forwarded client, 203.0.113.5, like the same refusal with its body: the head
    check resolves the client before auth plugins and the log see it."""
    server, _, _ = configured_server(tmp_path, mock_upstream.base_url,
                                     '[server]\ntrusted_proxies = ["127.0.0.1/32"]\n')
    headers = {"x-api-key": "sk-apx-not-a-key", "anthropic-version": "2023-06-01",
               "x-forwarded-for": "203.0.113.5", "content-type": "application/json"}
    body = b'{"model": "%s", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode()
    async with server:
        async with await RawConnection.open("127.0.0.1", server.port) as conn:     # whole: the gateway refuses
            assert (await conn.request("POST", "/v1/messages", headers, body)).status == 401
        async with await RawConnection.open("127.0.0.1", server.port) as conn:     # head only: refused from it
            await conn.send(request_bytes("POST", "/v1/messages", {**headers, "content-length": str(len(body))}))
            assert (await conn.read_response()).status == 401
        assert await server.stop(signal.SIGTERM) == 0
    access = [line for line in server.stderr.split("\n") if " apertis_proxy.access: " in line]
    clients = [pair.partition("=")[2] for line in access for pair in line.split() if pair.startswith("client=")]
    assert clients == ["203.0.113.5", "203.0.113.5"], access


@pytest.mark.parametrize("forwarded", ["for=127.0.0.1", "for=_hidden"], ids=["loopback", "obfuscated"])
async def test_a_forwarded_header_the_proxy_did_not_write_does_not_open_metrics(gateway_env, mock_upstream,
                                                                                 forwarded):
    """Behind the README's nginx recipe (nginx on 127.0.0.1 appends the peer to X-Forwarded-For), a remote
    client that adds its own `Forwarded: for=127.0.0.1` (or an obfuscated `for=_hidden`), which nginx passes through,
    is still 203.0.113.5, outside `[metrics] allow`: only `[server] forwarded_header` is read, and a hop that is no
    address makes the client unknown, never the proxy itself."""
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start(trusted_proxies=["127.0.0.1/32"])
    as_nginx_sends_it = {"x-forwarded-for": "203.0.113.5"}
    async with await RawConnection.open(gw.host, gw.port) as conn:
        honest = await conn.request("GET", "/metrics", as_nginx_sends_it)
    assert honest.status == 403
    async with await RawConnection.open(gw.host, gw.port) as conn:
        spoofed = await conn.request("GET", "/metrics", {**as_nginx_sends_it, "forwarded": forwarded})
    assert spoofed.status == 403, "a client-written Forwarded header opened /metrics"


@pytest.mark.parametrize(("allow", "forwarded_for", "status"), [
    (["2001:db8::/32"], "2001:db8::5", 200),            # an allowed host is refused
    (["2001:db8::1/128"], "2001:db8::1:5", 403),        # another host is taken for the allowed one
], ids=["allowed-v6-refused", "other-v6-admitted"])
async def test_an_ipv6_client_behind_a_trusted_proxy_is_judged_by_its_own_address(gateway_env, mock_upstream,
                                                                                   allow, forwarded_for, status):
    """A forwarded IPv6 client has no port ("2001:db8::5"); peers are "[v6]:port".  /metrics judges the
    forwarded address as itself: an allowed host gets 200, another host of the same prefix 403."""
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start(trusted_proxies=["127.0.0.1/32"], metrics_allow=allow)
    async with await RawConnection.open(gw.host, gw.port) as conn:
        reply = await conn.request("GET", "/metrics", {"x-forwarded-for": forwarded_for})
    assert reply.status == status


async def test_a_failover_before_an_abandoned_attempt_is_counted_as_failover(gateway_env, make_mock_upstream):
    """Channel `primary` answers 529 and the request fails over to `backup`; the client leaves while backup's
    head is still to come, so backup's attempt gets no outcome: it is `abandoned`, and primary's 529 is `failover`
    (another channel was tried), not `status` (an error passed on)."""
    primary, backup = await make_mock_upstream(), await make_mock_upstream()
    gateway_env.add_channel("primary", primary, priority=1)
    gateway_env.add_channel("backup", backup, priority=0)
    key = gateway_env.add_key("alice")
    gw = await gateway_env.start()
    primary.fail_next(529)
    backup.queue("hang")
    conn = await RawConnection.open(gw.host, gw.port)
    await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"},
                                  json_body={"model": MODEL, "max_tokens": 8, "stream": True,
                                             "messages": [{"role": "user", "content": "hi"}]}))
    await backup.wait_until(lambda: len(backup.requests) == 1, timeout=DRAIN_TIMEOUT)
    conn.abort()                                    # the client leaves before any byte of an answer
    await gateway_env.usage_rows(n=1)               # the request is over and metered
    samples = await scrape_samples(gateway_env.base_url)
    def attempts(channel: str, outcome: str) -> float:
        return value(samples, "apertis_upstream_attempts_total", channel=channel, outcome=outcome)
    assert attempts("backup", "abandoned") == 1
    assert (attempts("primary", "failover"), attempts("primary", "status")) == (1, 0)


class _PostgresGatewayEnv(GatewayEnv):
    """GatewayEnv on a PostgreSQL store."""

    def __init__(self, url: str) -> None:
        self.db_path = url
        self.conn = store_service.connect(url)
        self.gateway = None


async def test_a_readiness_probe_answered_after_sigterm_says_503(pg_url, mock_upstream, monkeypatch, tmp_path):
    """A readiness probe that is waiting on the store (a lock another PostgreSQL session holds on `channels`)
    when the graceful shutdown starts answers 503 "draining" once the store answers, not 200: `draining` is looked at
    again after the store."""
    import asyncpg

    from apertis_proxy.observe import readiness
    monkeypatch.setattr(readiness, "STORE_TIMEOUT", 60.0)      # the probe waits on the lock as long as held
    env = _PostgresGatewayEnv(pg_url)
    try:
        env.add_channel("main", mock_upstream)
        gw = await env.start(spool_dir=str(tmp_path / "spool"))     # not the working directory's
        locker = await asyncpg.connect(pg_url)
        try:
            lock = locker.transaction()
            await lock.start()
            await locker.execute("LOCK TABLE channels IN ACCESS EXCLUSIVE MODE")
            probe = await RawConnection.open(gw.host, gw.port)
            await probe.send(request_bytes("GET", "/ready"))

            async def probe_waits_on_the_lock() -> bool:
                # The probe's query, or another one the store's thread runs before it, waits on the lock.
                return await locker.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                             " AND pid <> pg_backend_pid()") >= 1
            await wait_for(probe_waits_on_the_lock, DRAIN_TIMEOUT, "the probe to wait on the lock")
            shutdown = asyncio.create_task(gw.shutdown(timeout=5.0))
            await asyncio.sleep(0)                          # the shutdown has begun: draining is set
            assert gw.observe.readiness.draining
            await lock.rollback()
            reply = await probe.read_response(method="GET")
            probe.close()
            await shutdown
            env.gateway = None
        finally:
            await locker.close()
    finally:
        await env.stop()
        env.close()
    assert reply.status == 503, reply.body


def _worker_of(conn: RawConnection, port: int, workers: list[int]) -> int:
    """The worker holding the server end of `conn` (from /proc)."""
    local_port = conn.writer.get_extra_info("sockname")[1]
    owners = [w for w in workers if sockets_of(w, local_port=port, remote_port=local_port, state=TCP_ESTABLISHED)]
    assert len(owners) == 1, owners
    return owners[0]


async def _scrape_on_each_worker(server: ServeProcess, workers: list[int]) -> dict[int, float]:
    """{worker: apertis_requests_total for /v1/messages} from one scrape answered by each worker."""
    seen: dict[int, float] = {}

    async def both() -> bool:
        async with await RawConnection.open("127.0.0.1", server.port) as conn:
            reply = await conn.request("GET", "/metrics")
            assert reply.status == 200
            seen.setdefault(_worker_of(conn, server.port, workers),
                            total(parse(reply.body.decode()), "apertis_requests_total", endpoint="/v1/messages"))
        return len(seen) == len(workers)
    await wait_for(both, DRAIN_TIMEOUT, "a scrape answered by each worker")
    return seen


async def _ask_on_a_new_connection(server: ServeProcess, key: str, workers: list[int]) -> int:
    """One answered Messages request on a connection of its own; the worker that served it."""
    async with await RawConnection.open("127.0.0.1", server.port) as conn:
        reply = await conn.request("POST", "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"},
                                   json_body={"model": MODEL, "max_tokens": 8,
                                              "messages": [{"role": "user", "content": "x"}]})
        assert reply.status == 200, reply.body
        return _worker_of(conn, server.port, workers)


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the workers in Linux /proc")
async def test_every_worker_scrapes_the_same_request_count(tmp_path, mock_upstream):
    """With --workers and a flush interval of 30 s, every worker's scrape counts every request answered so far:
    the worker answering a scrape asks the others to write their figures before it reads them."""
    server, _, key = configured_server(tmp_path, mock_upstream.base_url, "[metrics]\nflush_interval = 30\n",
                                       "--workers", "2")
    async with server:
        workers = await listening_workers(server, 2)
        served: list[int] = []
        while len(set(served)) < 2 and len(served) < 200:   # until each worker has served one
            served.append(await _ask_on_a_new_connection(server, key, workers))
        assert len(set(served)) == 2, "new connections never reached the second worker"
        counts = await _scrape_on_each_worker(server, workers)
        assert await server.stop(signal.SIGTERM) == 0
    assert set(counts.values()) == {len(served)}, f"{len(served)} requests answered; scrapes by worker: {counts}"


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the workers in Linux /proc")
async def test_a_killed_worker_takes_back_no_request_a_scrape_already_counted(tmp_path, mock_upstream):
    """A request that one scrape counted stays counted after the worker that answered it is SIGKILLed and
    replaced (no share happens within the 30 s flush interval): the worker writes the figures it answers with before
    it answers, and a counter never goes down, which Prometheus would read as a reset."""
    server, _, key = configured_server(tmp_path, mock_upstream.base_url, "[metrics]\nflush_interval = 30\n",
                                       "--workers", "2")
    async with server:
        workers = await listening_workers(server, 2)
        victim = await _ask_on_a_new_connection(server, key, workers)
        before = (await _scrape_on_each_worker(server, workers))[victim]
        assert before == 1
        survivors = await crash_and_replace(server, victim)
        after = await _scrape_on_each_worker(server, survivors)
        assert await server.stop(signal.SIGTERM) == 0
    assert set(after.values()) == {before}, f"a scrape counted {before} request; after the crash: {after}"
