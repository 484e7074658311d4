"""Graceful shutdown and worker processes.

Subprocess tests run `apertis-proxy serve` as operators do and signal it: SIGTERM/SIGINT while a paced stream is in
flight (the port stops accepting, the stream still ends with message_stop, the process exits 0, the usage row is
on disk), a stream outliving `shutdown_timeout` (cut, metered as interrupted), and `--workers 2` (two processes
listening on one port through SO_REUSEPORT, both serving; which worker served is read from /proc, through the
upstream connections each one keeps in its pool). In-process tests drive `Gateway.shutdown()` directly with raw
connections for the draining details: idle keep-alive connections close at once, busy ones finish, and a response
started during the drain says `connection: close`.
"""
from __future__ import annotations

import asyncio
import logging
import json
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import anthropic
import pytest

from apertis_proxy.server import Gateway
from tests.support.rawhttp import RawConnection, parse_sse, request_bytes
from tests.support.served_gateway import DRAIN_TIMEOUT, StreamWatcher, configured_server, prepare_db, usage_rows
from tests.support.workers import TCP_ESTABLISHED, TCP_LISTEN, crash_and_replace, listening_workers, sockets_of
from tests.support.processes import MODEL, ServeProcess, connect_refused, sdk_client, wait_for

# -- signals -------------------------------------------------------------------------------------------------------

# A stream of ~20 events paced so that it is still in flight after the port closed, also on a loaded machine.
IN_FLIGHT_PACE = "event-delay=0.15"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_an_in_flight_stream(tmp_path, mock_upstream, signum):
    db = str(tmp_path / "gateway.db")
    key = prepare_db(db, mock_upstream.base_url)
    async with ServeProcess(tmp_path, db) as server:
        stream = StreamWatcher(server.base_url, key, IN_FLIGHT_PACE)
        await stream.started()
        server.send_signal(signum)

        async def refused() -> bool:
            return connect_refused(server.port)
        await wait_for(refused, DRAIN_TIMEOUT, "the listening socket to close")
        assert not stream.task.done()           # the port closed while the stream was still running

        await stream.finished()
        assert stream.error is None, repr(stream.error)
        assert stream.events[-1] == "message_stop"
        assert stream.final is not None and stream.final.stop_reason == "end_turn"
        assert stream.final.content[0].text == "".join(stream.pieces)
        assert await server.wait() == 0

    served = mock_upstream.served[-1]
    assert served["completed"]
    rows = usage_rows(db)                        # written before the process exited
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["interrupted"], row["error_type"]) == (200, 0, None)
    assert row["output_tokens"] == served["full_usage"]["output_tokens"] == stream.final.usage.output_tokens
    assert row["input_tokens"] == served["full_usage"]["input_tokens"]


async def test_stream_outliving_the_shutdown_deadline_is_cut_and_metered(tmp_path, mock_upstream):
    server, db, key = configured_server(tmp_path, mock_upstream.base_url, "[server]\nshutdown_timeout = 1\n")
    # Upstream goes quiet for longer than the deadline: the gateway is waiting on it, not on the client.
    async with server:
        stream = StreamWatcher(server.base_url, key, "event-delay=4")
        await stream.started()
        server.send_signal(signal.SIGTERM)
        await stream.finished()
        assert "message_stop" not in stream.events and stream.final is None
        # Told in-band, as Anthropic's API says overload mid-stream: the SDK raises its API error, not a
        # transport error about an incomplete body.
        assert isinstance(stream.error, anthropic.APIStatusError), repr(stream.error)
        assert "shutting down" in str(stream.error)
        assert await server.wait() == 0
        await mock_upstream.wait_until(lambda: mock_upstream.disconnects == 1)   # upstream was let go

    rows = usage_rows(db)
    assert len(rows) == 1
    row, served = rows[0], mock_upstream.served[-1]
    assert not served["completed"]
    assert (row["status"], row["interrupted"], row["error_type"]) == (200, 1, "gateway_stopped")
    assert row["input_tokens"] == served["usage"]["input_tokens"] > 0


# -- workers -------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets and processes from Linux /proc")
async def test_two_workers_share_the_port(tmp_path, mock_upstream):
    db = str(tmp_path / "gateway.db")
    key = prepare_db(db, mock_upstream.base_url)
    async with ServeProcess(tmp_path, db, "--workers", "2") as server:
        workers = await listening_workers(server, 2)
        assert sockets_of(server.proc.pid, local_port=server.port, state=TCP_LISTEN) == 0

        # Every request on a new connection: the kernel spreads connections over the two listening sockets.
        n = 16
        async with sdk_client(server.base_url, key) as client:
            for i in range(n):
                reply = await client.messages.create(
                    model=MODEL, max_tokens=32, messages=[{"role": "user", "content": f"worker probe {i}"}],
                    extra_headers={"connection": "close"})
                assert f"worker probe {i}" in reply.content[0].text
        # A worker only opens an upstream connection to serve a request, and keeps it in its pool.
        upstream_conns = {w: sockets_of(w, remote_port=mock_upstream.port, state=TCP_ESTABLISHED)
                          for w in workers}
        assert all(count >= 1 for count in upstream_conns.values()), upstream_conns

        async def all_metered() -> bool:
            return len(usage_rows(db)) == n
        await wait_for(all_metered, DRAIN_TIMEOUT, "a usage row per request from both workers")

        assert await server.stop(signal.SIGTERM) == 0
    assert all(not Path(f"/proc/{w}").exists() for w in workers)
    assert connect_refused(server.port)
    rows = usage_rows(db)
    assert sorted(r["status"] for r in rows) == [200] * n
    # Both workers served: their request ids (the ledger's key) must still never repeat.
    ids = [r["request_id"] for r in rows]
    assert len(set(ids)) == n and all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids), ids


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets and processes from Linux /proc")
async def test_a_worker_that_dies_is_replaced_and_says_so(tmp_path, mock_upstream):
    """kill -9 of one worker: the parent logs it and starts another with the same share of the limits, so the
    capacity and the per-worker limits are whole again."""
    db = str(tmp_path / "gateway.db")
    key = prepare_db(db, mock_upstream.base_url)
    async with ServeProcess(tmp_path, db, "--workers", "2") as server:
        workers = await listening_workers(server, 2)
        victim = workers[0]
        workers = await crash_and_replace(server, victim)
        async with sdk_client(server.base_url, key) as client:
            for i in range(6):
                reply = await client.messages.create(
                    model=MODEL, max_tokens=32, messages=[{"role": "user", "content": f"after the crash {i}"}],
                    extra_headers={"connection": "close"})
                assert f"after the crash {i}" in reply.content[0].text
        assert await server.stop(signal.SIGTERM) == 0
    assert f"(pid {victim}) ended unexpectedly (signal 9); starting a new one" in server.stderr
    assert all(not Path(f"/proc/{w}").exists() for w in workers)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets and processes from Linux /proc")
async def test_workers_end_when_their_parent_is_killed(tmp_path, mock_upstream):
    """SIGKILL of the parent (nothing forwards the signal then) does not leave the workers serving, orphaned,
    with nobody to stop them: they get SIGTERM from the kernel (PR_SET_PDEATHSIG) and shut down."""
    db = str(tmp_path / "gateway.db")
    prepare_db(db, mock_upstream.base_url)
    async with ServeProcess(tmp_path, db, "--workers", "2") as server:
        workers = await listening_workers(server, 2)
        server.send_signal(signal.SIGKILL)
        await server.wait()

        def running(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] != "Z"
            except (OSError, IndexError):
                return False

        async def all_gone() -> bool:
            return not any(running(w) for w in workers)
        await wait_for(all_gone, DRAIN_TIMEOUT, "the orphaned workers to exit")
    assert connect_refused(server.port)


async def test_workers_that_fail_to_start_stop_the_server_and_say_why(tmp_path, mock_upstream):
    """Every worker failing to start (a TLS certificate file that holds no certificate: the parent checks only
    that it is there) stops the server with exit 1 and says why: a child's os._exit() leaves no interpreter to
    print the error, so the worker logs it itself."""
    db = str(tmp_path / "gateway.db")
    prepare_db(db, mock_upstream.base_url)
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = tmp_path / "apertis.toml"
    config.write_text(f'[server]\ntls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "key.pem"}"\n')
    server = ServeProcess(tmp_path, db, "--workers", "2", "--config", str(config))
    with open(server._err_path, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "apertis_proxy", *server.argv, cwd=tmp_path, env=server.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=err)
        assert await asyncio.wait_for(proc.wait(), DRAIN_TIMEOUT) == 1
    assert "cannot load tls_cert" in server.stderr
    assert "stopped while starting (exit code 1); stopping the server" in server.stderr


async def test_workers_on_a_taken_port_fail_once_before_any_starts(tmp_path, mock_upstream):
    """`serve --workers 2` on a port in use exits 1 with the error one worker gives, from the parent, before
    any worker is forked (the workers' SO_REUSEPORT would not notice a server that set it too)."""
    db = str(tmp_path / "gateway.db")
    prepare_db(db, mock_upstream.base_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = ServeProcess(tmp_path, db, "--workers", "2", port=port)
        with open(server._err_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "apertis_proxy", *server.argv, cwd=tmp_path, env=server.env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=err)
            assert await asyncio.wait_for(proc.wait(), DRAIN_TIMEOUT) == 1
    assert f"cannot listen on 127.0.0.1 port {port}: Address already in use" in server.stderr
    assert "worker" not in server.stderr, server.stderr


# -- Gateway.shutdown() in process -----------------------------------------------------------------------------------

def message_request(key: str, text: str, *, stream: bool = False, scenario: str = "") -> bytes:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    if scenario:
        headers["x-mock-scenario"] = scenario
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return request_bytes("POST", "/v1/messages", headers, json_body=body)


async def test_shutdown_closes_idle_connections_and_lets_busy_ones_finish(gateway):
    host, port = gateway.gateway.host, gateway.gateway.port
    mock = gateway.mock
    idle = await RawConnection.open(host, port)
    slow = await RawConnection.open(host, port)
    streaming = await RawConnection.open(host, port)
    try:
        # idle: one request answered, connection kept alive.
        await idle.send(message_request(gateway.key, "warm up"))
        warm = await idle.read_response()
        assert warm.status == 200 and (warm.header("connection") or "").lower() != "close"

        # slow: upstream holds the answer back, so its response head is written during the drain.
        await slow.send(message_request(gateway.key, "slow answer", scenario="first-byte-delay=1.5"))
        # streaming: its head went out before the drain; events keep coming during it.
        await streaming.send(message_request(gateway.key, "stream through the drain", stream=True,
                                             scenario="event-delay=0.1"))
        head = await streaming.read_head()
        assert head.status == 200
        chunks = streaming.iter_chunks(head)
        first = await chunks.__anext__()
        assert b"message_start" in first
        await mock.wait_until(lambda: len(mock.requests) == 3)

        shutdown = asyncio.create_task(gateway.gateway.shutdown(timeout=DRAIN_TIMEOUT))
        assert await idle.read_until_eof() == b""   # closed at once, with nothing more sent...
        assert not shutdown.done()                  # ...while the busy ones are still being waited for
        assert connect_refused(port)                # and no new connection is accepted

        slow_response = await slow.read_response(timeout=DRAIN_TIMEOUT)
        assert slow_response.status == 200 and "slow answer" in slow_response.json()["content"][0]["text"]
        assert (slow_response.header("connection") or "").lower() == "close"
        assert await slow.read_until_eof() == b""

        body = first + b"".join([chunk async for chunk in chunks])
        assert parse_sse(body)[-1][0] == "message_stop"
        assert await streaming.read_until_eof() == b""
        await asyncio.wait_for(shutdown, DRAIN_TIMEOUT)
    finally:
        for conn in (idle, slow, streaming):
            conn.abort()
    gateway.gateway = None                          # already shut down

    rows = gateway.query("SELECT status, interrupted, stream FROM usage ORDER BY id")
    assert [(r["status"], r["interrupted"]) for r in rows] == [(200, 0)] * 3
    assert sorted(r["stream"] for r in rows) == [0, 0, 1]


async def test_shutdown_deadline_cuts_a_quiet_stream_and_meters_it(gateway):
    host, port = gateway.gateway.host, gateway.gateway.port
    mock = gateway.mock
    conn = await RawConnection.open(host, port)
    received: list[bytes] = []
    try:
        # Upstream goes quiet after the first event: the handler is waiting on upstream, not on the client.
        await conn.send(message_request(gateway.key, "never finishes", stream=True, scenario="event-delay=30"))
        head = await conn.read_head()
        chunks = conn.iter_chunks(head)
        received.append(await chunks.__anext__())
        assert b"message_start" in received[0]
        await asyncio.wait_for(gateway.gateway.shutdown(timeout=0.3), DRAIN_TIMEOUT)
        gateway.gateway = None
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):   # cut: no terminating chunk
            async for chunk in chunks:
                received.append(chunk)
    finally:
        conn.abort()
    body = b"".join(received)
    assert b"message_stop" not in body
    # The last thing before the close is the in-band error event, whole.
    assert parse_sse(body)[-1][0] == "error"
    assert json.loads(parse_sse(body)[-1][1])["error"]["type"] == "overloaded_error"
    await mock.wait_until(lambda: mock.disconnects == 1)     # the upstream connection was let go

    rows = [dict(r) for r in gateway.query("SELECT * FROM usage")]
    assert len(rows) == 1, "the cut stream was not metered before shutdown() returned"
    assert (rows[0]["status"], rows[0]["interrupted"], rows[0]["error_type"]) == (200, 1, "gateway_stopped")
    assert rows[0]["input_tokens"] == mock.served[-1]["usage"]["input_tokens"] > 0


async def test_connections_accepted_as_shutdown_begins_are_reset_not_served_unseen(gateway):
    """A burst accepted in the same loop iteration as the start of shutdown reaches `connection_made` only after
    shutdown looked for connections to drain. Those connections are reset, as ones still in the kernel's queue
    are: nothing is forwarded that shutdown would not wait for (no upstream request without its usage row, no
    handler still running after shutdown returned)."""
    gw = gateway.gateway
    loop = asyncio.get_running_loop()
    listening = gw._listener.sockets[0]
    started: list[asyncio.Task] = []

    def accept_then_shut_down(sock):
        gw._listener._accept(sock)
        if not started:
            started.append(loop.create_task(gw.shutdown(timeout=DRAIN_TIMEOUT)))
    loop.remove_reader(listening.fileno())
    loop.add_reader(listening.fileno(), accept_then_shut_down, listening)

    request = message_request(gateway.key, "too late", scenario="first-byte-delay=0.2")
    clients = []
    for _ in range(20):
        client = socket.create_connection((gw.host, gw.port), timeout=5)
        client.sendall(request)
        clients.append(client)
    while not started:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(started[0], DRAIN_TIMEOUT)
    gateway.gateway = None                          # already shut down

    assert not gw.state.tasks and not gw.state.connections
    await asyncio.sleep(0.3)                        # what an unseen handler would have sent upstream by now
    assert gateway.mock.requests == []
    assert gateway.query("SELECT COUNT(*) AS n FROM usage")[0]["n"] == 0

    def outcome(client: socket.socket) -> str:
        try:
            return "eof" if client.recv(65536) == b"" else "answered"
        except ConnectionResetError:
            return "reset"
        finally:
            client.close()
    outcomes = await loop.run_in_executor(None, lambda: [outcome(c) for c in clients])
    assert set(outcomes) <= {"reset", "eof"}, outcomes


async def test_a_gateway_serves_on_a_socket_it_is_handed(gateway_env, mock_upstream):
    """`Gateway.start(sock=...)` (socket activation, tests): a bound socket, listening or not, is served."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))                    # bound, not listening: start() makes it listen
    gateway_env.gateway = gw = Gateway(gateway_env.settings())
    await gw.start(sock=sock)
    assert gw.port == sock.getsockname()[1]
    conn = await RawConnection.open(gw.host, gw.port)
    try:
        await conn.send(message_request(key, "handed a socket"))
        response = await conn.read_response()
        assert response.status == 200 and "handed a socket" in response.json()["content"][0]["text"]
    finally:
        conn.abort()


async def test_a_port_taken_between_bind_and_listen_fails_start_and_lets_go_of_its_threads(gateway_env, mock_upstream,
                                                                                          caplog):
    """Two servers racing for a port can both bind (SO_REUSEADDR) and only one listen: the loser's start() fails
    and closes its plugins and watcher, whose threads would otherwise keep the process alive with nothing served.
    A shutdown() after it has nothing left to close (closing the plugins again made the keys plugin retry saving
    spend against the closed store, with a traceback each time)."""
    gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    winner, loser = _port_race()
    threads = threading.active_count()
    gw = Gateway(gateway_env.settings())
    try:
        with pytest.raises(OSError):
            await gw.start(sock=loser)
        assert loser.fileno() == -1                 # closed
        await wait_for(lambda: _fewer_threads(threads), 5.0, "the plugins' threads to end")
        with caplog.at_level(logging.WARNING):
            await gw.shutdown(timeout=0.1)
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        winner.close()


def _port_race() -> tuple[socket.socket, socket.socket]:
    """Two sockets bound to one port (SO_REUSEADDR), the first listening: the second's listen() fails."""
    winner, loser = socket.socket(), socket.socket()
    for s in (winner, loser):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    winner.bind(("127.0.0.1", 0))
    loser.bind(("127.0.0.1", winner.getsockname()[1]))
    winner.listen()
    return winner, loser


async def _fewer_threads(limit: int) -> bool:
    return threading.active_count() <= limit


async def test_a_worker_whose_listen_fails_hands_back_its_metrics_share(gateway_env, mock_upstream, tmp_path,
                                                                        monkeypatch):
    """A worker of `serve --workers 2` that loses the race for its port after the metrics share started
    closes the share too: no ask socket is left in the run directory for the other workers' scrapes to wait
    on, and the worker is marked ended (its counts kept for the next scrape)."""
    from apertis_proxy.observe import shared
    monkeypatch.setenv(shared.RUN_DIR_ENV, str(tmp_path))
    gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    winner, loser = _port_race()
    gw = Gateway(gateway_env.settings(), worker=1, workers=2)
    try:
        with pytest.raises(OSError):
            await gw.start(sock=loser)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert not [n for n in names if n.startswith("ask-")], names
        assert [n for n in names if n.startswith("dead-")], names
        await gw.shutdown(timeout=0.1)              # nothing left to close: no error
    finally:
        winner.close()
