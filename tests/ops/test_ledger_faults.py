"""Exactly-once metering when things go wrong around the ledger: a row the database cannot store, a gateway
killed mid-stream, a full spool disk, a database that takes no writes for a while.

Real `apertis-proxy serve` processes, the mock upstream on 127.0.0.1, real SQLite files, a throwaway PostgreSQL
server (tests/support), and for the full disk a tmpfs of the gateway's own in a mount namespace (skipped where
unshare and mount are not allowed).
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from apertis_proxy import cli
from apertis_proxy.store import service
from tests.support.gateway_process import GatewayProcess
from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.processes import wait_for

HAIKU = "claude-haiku-4-5-20251001"


def setup_store(db: str, upstream: MockUpstream, *key_flags: str) -> str:
    """A channel to the mock and a key `alice` (with `key_flags`, e.g. --quota 0.001); the key."""
    assert cli.main(["channels", "add", "main", "--base-url", upstream.base_url, "--api-key", MOCK_API_KEY,
                     "--db", db]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["keys", "create", "alice", *key_flags, "--db", db]) == 0
    return re.search(r"sk-apx-[A-Za-z0-9_-]+", out.getvalue()).group(0)


def post(port: int, key: str, body: dict, scenario: Optional[str] = None,
         timeout: float = 10.0) -> tuple[int, str, bytes]:
    """(status, request id, body) of one POST /v1/messages; `scenario` goes to the mock as x-mock-scenario."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": key}
        if scenario:
            headers["x-mock-scenario"] = scenario
        conn.request("POST", "/v1/messages", body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("request-id") or "", response.read()
    finally:
        conn.close()


def message(**extra) -> dict:
    return {"model": HAIKU, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **extra}


def ledger_ids(db: str) -> set[str]:
    conn = service.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT request_id FROM usage")}
    finally:
        conn.close()


def ledger_row(db: str, request_id: str) -> tuple:
    """(interrupted, input_tokens, cost) of the request's ledger row."""
    conn = service.connect(db)
    try:
        return tuple(conn.execute("SELECT interrupted, input_tokens, cost FROM usage WHERE request_id = ?",
                                  (request_id,)).fetchone())
    finally:
        conn.close()


def ledger_error_types(db: str) -> set:
    conn = service.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT error_type FROM usage")}
    finally:
        conn.close()


async def ledger_holds(db: str, wanted: set[str], timeout: float) -> set[str]:
    """The ledger's request ids once they include `wanted`, or as they are when `timeout` ran out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ids = await asyncio.to_thread(ledger_ids, db)
        if wanted <= ids or loop.time() > deadline:
            return ids
        await asyncio.sleep(0.1)


# What a gateway logs for a row the ledger refused, and for a shipment the database refused.
REFUSED_ROW = "usage row refused by the ledger and left out"
FAILED_SHIPMENT = "usage rows failed"


def log_count(host: GatewayProcess, text: str) -> int:
    """How many lines of the gateway's log hold `text`."""
    return sum(text in line for line in list(host.lines))


async def logged_again(host: GatewayProcess, text: str, before: int, what: str) -> None:
    """Until more than `before` lines of the gateway's log hold `text`."""
    async def more() -> bool:
        return log_count(host, text) > before
    await wait_for(more, 10.0, what)


# -- 1. one row the ledger refuses stops a worker's shipping for good ------------------------------------------------

async def test_a_row_the_ledger_refuses_alone_in_its_segment_does_not_stop_the_rows_after_it(pg_url, tmp_path):
    """A row PostgreSQL cannot store for a value of its own (here a `service_tier` holding NUL, which a TEXT
    column cannot hold) is logged and left out also when it is shipped alone, as it is under a light load; it
    does not hold back the rows after it.  Only the database refusing (or a constraint every row violates)
    keeps rows spooled."""
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, pg_url, mock)
        host = await asyncio.to_thread(GatewayProcess.start, pg_url, tmp_path / "a", flush_interval=0.05)
        try:
            status, poisoned, _ = await asyncio.to_thread(
                post, host.port, key, message(), 'usage={"service_tier": "standard\\u0000"}')
            assert status == 200
            # Shipped (and refused) alone, in a segment of its own.
            await logged_again(host, REFUSED_ROW, 0, "the poisoned row to be refused")
            answered = []
            for _ in range(3):
                status, request_id, _ = await asyncio.to_thread(post, host.port, key, message())
                assert status == 200
                answered.append(request_id)
            ids = await ledger_holds(pg_url, set(answered), timeout=10.0)
            assert set(answered) <= ids, (f"{len(set(answered) - ids)} of 3 answered requests never reached the "
                                          f"ledger after the refused row {poisoned}:\n{host.log[-1500:]}")
        finally:
            await asyncio.to_thread(host.kill)


# -- 2. a gateway killed in the middle of a stream ------------------------------------------------------------------

# $0.20 of Haiku 4.5 input (200,000 tokens at $1 per million) in message_start, then a slow stream.
COSTLY_START = 'usage={"input_tokens": 200000}; event-delay=3'


def open_stream(port: int, key: str) -> tuple[http.client.HTTPConnection, str]:
    """A stream started through the gateway, read up to its message_start (whose usage reports the input the
    upstream bills); the connection, left open, and the request id."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("POST", "/v1/messages", body=json.dumps(message(stream=True)).encode(),
                 headers={"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": key,
                          "x-mock-scenario": COSTLY_START})
    response = conn.getresponse()
    assert response.status == 200
    while b"message_start" not in response.readline():
        pass
    return conn, response.getheader("request-id") or ""


async def killed_mid_stream(db: str, workdir: Path, key: str) -> tuple[str, GatewayProcess]:
    """A gateway (leases of 1 s) killed with -9 while a stream that reported $0.20 of input is open, and a gateway
    started again on the same database and spool, once the killed one's lease ran out; (request id, new gateway)."""
    lease = 1.0
    limits = {"limits": {"lease_seconds": lease}}
    first = await asyncio.to_thread(GatewayProcess.start, db, workdir, tables=limits)
    conn, request_id = await asyncio.to_thread(open_stream, first.port, key)
    await asyncio.to_thread(first.kill)
    killed = time.monotonic()
    conn.close()
    again = await asyncio.to_thread(GatewayProcess.start, db, workdir, tables=limits)
    # Its spool was adopted at start; its lease, renewed at the latest when it was killed, runs out a lease later.
    await asyncio.sleep(max(0.0, killed + 2 * lease - time.monotonic()))
    return request_id, again


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """Each store: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "gw.db")
    return request.getfixturevalue("pg_url")


async def test_a_stream_cut_by_kill9_after_message_start_still_gets_its_ledger_row(store_url, tmp_path):
    """A stream whose message_start reported 200,000 input tokens (billed by the upstream whatever happens next)
    is metered also when the gateway is killed with -9 before it ends: its interim row was spooled with that
    first report, and the gateway started on the same spool ships it, flagged interrupted."""
    db = store_url
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        request_id, again = await killed_mid_stream(db, tmp_path / "gw", key)
        try:
            status, control, _ = await asyncio.to_thread(post, again.port, key, message())
            assert status == 200
            ids = await ledger_holds(db, {request_id, control}, timeout=5.0)
            assert control in ids                   # the gateway started again ships its own rows
            assert request_id in ids, "the stream cut by kill -9 has no ledger row"
            interrupted, input_tokens, cost = await asyncio.to_thread(ledger_row, db, request_id)
            assert (bool(interrupted), input_tokens) == (True, 200_000)
            # Haiku 4.5: the input at $1 per million, and message_start's one output token at $5 per million.
            assert cost == pytest.approx(0.200005)
        finally:
            await asyncio.to_thread(again.kill)


async def test_a_request_cut_by_kill9_before_its_answer_is_in_the_ledger_with_its_usage_unknown(store_url,
                                                                                                  tmp_path):
    """A non-streaming request the upstream had taken (it may bill it) when the gateway was killed with -9,
    before any usage was known: the gateway started on the same spool ships a row for it, its cost unknown
    (NULL: counted apart, as unpriced) and error_type gateway_stopped, so the ledger still shows every request
    that reached an upstream."""
    db = store_url
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock)
        first = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            slow = asyncio.ensure_future(asyncio.to_thread(post, first.port, key, message(), "first-byte-delay=5"))
            while not mock.requests:
                await asyncio.sleep(0.02)
        finally:
            await asyncio.to_thread(first.kill)
        with contextlib.suppress(OSError, http.client.HTTPException):
            await slow
        again = await asyncio.to_thread(GatewayProcess.start, db, tmp_path / "gw")
        try:
            for _ in range(50):                 # shipped at the start, after adoption
                ids = await asyncio.to_thread(ledger_ids, db)
                if ids:
                    break
                await asyncio.sleep(0.1)
            assert len(ids) == 1, "the request cut by kill -9 before its answer has no ledger row"
            interrupted, input_tokens, cost = await asyncio.to_thread(ledger_row, db, ids.pop())
            assert (bool(interrupted), input_tokens, cost) == (True, 0, None)
            assert "gateway_stopped" in await asyncio.to_thread(ledger_error_types, db)
        finally:
            await asyncio.to_thread(again.kill)


async def test_a_quota_counts_a_stream_cut_by_kill9_once_its_lease_ran_out(store_url, tmp_path):
    """The cost a stream had reported when its gateway was killed keeps counting against the key's quota once
    the killed process's lease on its admission ran out: as the ledger row adopted from the spool, so a key $0.15
    past its $0.05 quota gets 402."""
    db = store_url
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, db, mock, "--quota", "0.05")
        _, again = await killed_mid_stream(db, tmp_path / "gw", key)
        try:
            status, _, body = await asyncio.to_thread(post, again.port, key, message())
            assert status == 402, f"a key $0.15 past its $0.05 quota was answered {status}: {body[:200]!r}"
        finally:
            await asyncio.to_thread(again.kill)


# -- 3. a full disk under the spool ----------------------------------------------------------------------------------

SPOOL_FS_BYTES = 64 * 1024


def small_spool_prefix(spool_dir: Path) -> list[str]:
    """The command prefix that runs a gateway with `spool_dir` on a tmpfs of SPOOL_FS_BYTES of its own (a mount
    namespace of its own: the test's host sees the directory as it was); skips where mounts cannot be made."""
    mount = f'mount -t tmpfs -o size={SPOOL_FS_BYTES} apertis-spool "$0" && exec "$@"'
    spool_dir.mkdir(parents=True, exist_ok=True)
    for user in ([], ["--map-root-user"]):
        prefix = ["unshare", "--mount", "--propagation", "private", *user, "--", "sh", "-c", mount, str(spool_dir)]
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            break
    pytest.skip("no mount namespace with a tmpfs of its own here (unshare, mount)")


def fill(directory: str) -> str:
    """Fill the file system under `directory` to the last byte; the filler file's path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    with open(path, "ab", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")
    return path


def seen_by(host: GatewayProcess, spool_dir: Path) -> str:
    """`spool_dir` as the gateway sees it (on its tmpfs), from this process."""
    return f"/proc/{host.proc.pid}/root{spool_dir}"


async def test_rows_of_a_disk_full_moment_are_shipped_once_the_disk_has_room_again(tmp_path):
    """With the spool's disk full, shipping cannot open the next segment: the rows go to one in memory (loudly),
    shipping goes on, and the requests answered during and after the full disk reach the ledger."""
    db, spool_dir = tmp_path / "gw.db", tmp_path / "spool"
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, str(db), mock)
        host = await asyncio.to_thread(GatewayProcess.start, str(db), tmp_path / "gw",
                                       tables={"ledger": {"spool_dir": str(spool_dir)}},
                                       prefix=small_spool_prefix(spool_dir))
        try:
            status, before, _ = await asyncio.to_thread(post, host.port, key, message())
            assert status == 200 and before in await ledger_holds(str(db), {before}, timeout=5.0)
            filler = await asyncio.to_thread(fill, seen_by(host, spool_dir))
            status, during, _ = await asyncio.to_thread(post, host.port, key, message())
            assert status == 200
            await asyncio.sleep(0.5)            # a shipment or two with the disk full
            os.unlink(filler)
            status, after, _ = await asyncio.to_thread(post, host.port, key, message())
            assert status == 200
            ids = await ledger_holds(str(db), {during, after}, timeout=10.0)
            assert {during, after} <= ids, (f"{len({during, after} - ids)} of the 2 requests answered during and "
                                            f"after the full disk are not in the ledger")
        finally:
            await asyncio.to_thread(host.kill)


def copy_spool_out(spool_fd: int, destination: Path) -> None:
    """The spool files of a killed gateway's tmpfs, reached through a directory descriptor opened before the kill
    (its mount namespace is gone), copied to `destination` as they were."""
    destination.mkdir(parents=True)
    for name in os.listdir(spool_fd):
        if name.endswith((".spool", ".spool2")):
            with open(os.open(name, os.O_RDONLY, dir_fd=spool_fd), "rb") as f:
                (destination / name).write_bytes(f.read())


async def test_a_row_spooled_whole_after_a_disk_full_moment_survives_kill9(tmp_path):
    """A row the full disk took only part of is held in memory (loudly) and its torn part is cut off the segment,
    so the row written once the disk has room again is whole on its own line and survives `kill -9` (the row
    held in memory only is the documented price of the full disk)."""
    db, spool_dir = tmp_path / "gw.db", tmp_path / "spool"
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, str(db), mock)
        # Ships only at a size never reached: every row stays in the spool until the kill.
        host = await asyncio.to_thread(GatewayProcess.start, str(db), tmp_path / "gw", flush_interval=600.0,
                                       batch_size=100_000, tables={"ledger": {"spool_dir": str(spool_dir)}},
                                       prefix=small_spool_prefix(spool_dir))
        spool_fd = -1
        try:
            filler = await asyncio.to_thread(fill, seen_by(host, spool_dir))
            whole = []
            for _ in range(40):            # rows fill the last page of the segment, until one does not fit
                status, request_id, _ = await asyncio.to_thread(post, host.port, key, message())
                assert status == 200
                if "unwritable" in host.log:
                    break
                whole.append(request_id)
            assert "unwritable" in host.log
            os.unlink(filler)
            status, after, _ = await asyncio.to_thread(post, host.port, key, message())
            assert status == 200 and host.log.count("unwritable") == 1       # written whole
            spool_fd = os.open(seen_by(host, spool_dir), os.O_RDONLY | os.O_DIRECTORY)
            await asyncio.to_thread(host.kill)
            copy_spool_out(spool_fd, tmp_path / "adopted")
        finally:
            await asyncio.to_thread(host.kill)
            if spool_fd >= 0:
                os.close(spool_fd)
        again = await asyncio.to_thread(GatewayProcess.start, str(db), tmp_path / "gw",
                                        tables={"ledger": {"spool_dir": str(tmp_path / "adopted")}})
        try:
            ids = await ledger_holds(str(db), {*whole, after}, timeout=5.0)
            assert set(whole) <= ids                # the rows before the full disk, adopted and shipped
            assert after in ids, "a row spooled whole after the disk had room again was lost at adoption"
        finally:
            await asyncio.to_thread(again.kill)


# -- 4. a PostgreSQL that takes no writes for a while ----------------------------------------------------------------

async def read_only_for_new_sessions(url: str, read_only: bool) -> None:
    """The database's sessions from now on read-only (or writable again), as a standby's are during a failover;
    every other session is ended, so the gateway's next ones get the setting."""
    import asyncpg
    name = url.split("?", 1)[0].rsplit("/", 1)[1]
    conn = await asyncpg.connect(url)
    try:
        setting = "SET default_transaction_read_only = on" if read_only else "RESET default_transaction_read_only"
        await conn.execute("SET default_transaction_read_only = off")      # this session may change it back
        await conn.execute(f'ALTER DATABASE "{name}" {setting}')
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           " WHERE datname = $1 AND pid <> pg_backend_pid()", name)
    finally:
        await conn.close()


async def test_rows_answered_while_postgresql_is_read_only_ship_once_it_takes_writes(pg_url, tmp_path):
    """Whatever the database answers a shipment with (here `cannot execute INSERT in a read-only transaction`, as
    from a server in recovery during a failover) keeps the rows spooled and retried with a back-off: the
    requests answered while it took no writes reach the ledger once it does."""
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        key = await asyncio.to_thread(setup_store, pg_url, mock)
        host = await asyncio.to_thread(GatewayProcess.start, pg_url, tmp_path / "a", flush_interval=0.05)
        try:
            status, before, _ = await asyncio.to_thread(post, host.port, key, message())
            assert status == 200 and before in await ledger_holds(pg_url, {before}, timeout=5.0)
            await read_only_for_new_sessions(pg_url, True)
            refused = log_count(host, FAILED_SHIPMENT)
            status, during, _ = await asyncio.to_thread(post, host.port, key, message())
            assert status == 200
            await logged_again(host, FAILED_SHIPMENT, refused, "a shipment refused while read-only")
            await read_only_for_new_sessions(pg_url, False)
            status, after, _ = await asyncio.to_thread(post, host.port, key, message())
            assert status == 200
            ids = await ledger_holds(pg_url, {during, after}, timeout=15.0)
            assert {during, after} <= ids, (f"{len({during, after} - ids)} of the 2 requests answered during and "
                                            f"after the read-only moment are not in the ledger")
        finally:
            await asyncio.to_thread(host.kill)
