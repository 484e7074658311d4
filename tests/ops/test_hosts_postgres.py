"""Two gateway processes ("hosts") sharing one PostgreSQL store: configuration made on one host,
or by the CLI, reaches the other within a second; a store that cannot be reached answers 503."""
from __future__ import annotations

import asyncio
import re

import pytest

from apertis_proxy import cli
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.pg_server import PgServer, PgUnavailable, memory_folder

PROPAGATION = 1.0     # seconds: the bound for a change to reach every host
PASSWORD = "pw-never-logged"


def with_password(url: str) -> str:
    """The same database with a password in the URL (the test server trusts local users, so any works)."""
    return url.replace("apertis@", f"apertis:{PASSWORD}@")


def _cli(*argv: str) -> None:
    assert cli.main(list(argv)) == 0


def _create_key(db: str, name: str, capsys) -> str:
    capsys.readouterr()
    _cli("keys", "create", name, "--db", db)
    return re.search(r"sk-apx-[A-Za-z0-9_-]+", capsys.readouterr().out).group(0)


@pytest.fixture
async def upstream():
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        yield mock


@pytest.fixture
async def hosts(pg_url, tmp_path, upstream):
    _cli("channels", "add", "main", "--base-url", upstream.base_url, "--api-key", MOCK_API_KEY, "--db", pg_url)
    started = []
    for name in ("a", "b"):
        started.append(await asyncio.to_thread(GatewayProcess.start, with_password(pg_url), tmp_path / name))
    yield started
    for host in started:
        await asyncio.to_thread(host.stop)
        assert PASSWORD not in host.log and "apertis:***@" in host.log


async def _status(host: GatewayProcess, key) -> int:
    return (await asyncio.to_thread(host.post_message, key))[0]


async def _within(seconds: float, check) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        if await check():
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def test_a_key_created_and_disabled_by_the_cli_reaches_both_hosts(pg_url, hosts, capsys):
    a, b = hosts
    key = await asyncio.to_thread(_create_key, pg_url, "alice", capsys)
    assert await _within(PROPAGATION, lambda: _all_status([a, b], key, 200))
    await asyncio.to_thread(_cli, "keys", "disable", "alice", "--db", pg_url)
    assert await _within(PROPAGATION, lambda: _all_status([a, b], key, 401))


async def _all_status(hosts, key, expected: int) -> bool:
    return all([await _status(h, key) == expected for h in hosts])


async def test_a_channel_disabled_by_one_host_gets_no_traffic_from_the_other(pg_url, hosts, capsys, upstream):
    a, b = hosts
    async with MockUpstream(api_key="sk-ant-the-right-one") as refusing:
        # Higher priority, but its key is not the one the upstream accepts: 401, the channel is disabled.
        await asyncio.to_thread(_cli, "channels", "add", "stale", "--base-url", refusing.base_url, "--api-key",
                                "sk-ant-revoked", "--priority", "10", "--db", pg_url)
        key = await asyncio.to_thread(_create_key, pg_url, "alice", capsys)
        assert await _within(PROPAGATION, lambda: _all_status([a, b], key, 200))
        seen = len(refusing.requests)
        assert seen >= 1          # host a and b each tried it once at most before it was disabled
        await asyncio.sleep(PROPAGATION)
        before = len(refusing.requests)
        for _ in range(10):
            assert await _status(b, key) == 200
            assert await _status(a, key) == 200
        assert len(refusing.requests) == before
        capsys.readouterr()
        await asyncio.to_thread(_cli, "channels", "list", "--json", "--db", pg_url)
        assert '"upstream 401' in capsys.readouterr().out


async def test_an_unreachable_store_answers_503_never_401(pg_server, tmp_path, capsys):
    # pg_server: PostgreSQL is there (or the test skips, or fails in CI); this test stops a server of its own.
    try:
        server = await asyncio.to_thread(PgServer.start, True, memory_folder())     # a crash keeps what it committed
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    try:
        db = await asyncio.to_thread(server.create_database, "down")
        async with MockUpstream(api_key=MOCK_API_KEY) as mock:
            await asyncio.to_thread(_cli, "channels", "add", "main", "--base-url", mock.base_url, "--api-key",
                                    MOCK_API_KEY, "--db", db)
            known = await asyncio.to_thread(_create_key, db, "alice", capsys)
            host = await asyncio.to_thread(GatewayProcess.start, with_password(db), tmp_path / "a")
            try:
                assert await _status(host, known) == 200
                await asyncio.to_thread(server.stop, "immediate")
                # The watcher notices the lost connection; an unknown key is then not "invalid".
                status = None

                async def refused_unknown() -> bool:
                    nonlocal status
                    status, headers, body = await asyncio.to_thread(host.post_message, "sk-apx-unknown")
                    return status == 503 and "retry-after" in headers and b"api_error" in body
                assert await _within(10.0, refused_unknown), status
                assert await _status(host, known) == 200          # served from the last snapshot
                await asyncio.to_thread(server.start_again)
                assert await _within(10.0, lambda: _all_status([host], "sk-apx-unknown", 401))
            finally:
                await asyncio.to_thread(host.stop)
            assert "unreachable" in host.log or "cannot listen" in host.log     # the outage was logged...
            assert PASSWORD not in host.log                                     # ...without the password
    finally:
        await asyncio.to_thread(server.close)
