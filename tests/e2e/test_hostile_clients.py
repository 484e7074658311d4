"""Clients that try to make the gateway spend memory, CPU or descriptors for nothing: uploads without a valid key
(refused from the head, before the body is read) and connections past the cap (idle keep-alive connections are shed
first). Real sockets on 127.0.0.1 against an in-process gateway; each test runs in about a second."""
from __future__ import annotations

import asyncio
import resource
import signal
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from apertis_proxy import plugin_host
from apertis_proxy.plugin_api import AUTH_GROUP
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.gateway_requests import assert_error as assert_gateway_error
from tests.support.processes import MODEL, ServeProcess, sdk_client
from tests.support.served_gateway import prepare_db

BIG = 30 * 1024 * 1024
# A read timeout far below the body timeout: an answer must come from the head, not after the body.
ANSWER_WITHIN = 5.0


async def connect(env) -> RawConnection:
    return await RawConnection.open(env.gateway.host, env.gateway.port)


@pytest.mark.parametrize("credential", [{}, {"x-api-key": "sk-apx-not-a-key"},
                                        {"authorization": "Bearer sk-apx-not-a-key"}],
                         ids=["no-key", "unknown-key", "unknown-bearer"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_read(gateway, credential, framing):
    """The head announces 30 MB and the first 64 KB follow: the 401 comes at once, the connection closes, and the
    body is never buffered or parsed."""
    headers = {**credential, "content-type": "application/json"}
    if framing == "chunked":
        headers["transfer-encoding"] = "chunked"
    else:
        headers["content-length"] = str(BIG)
    async with await connect(gateway) as conn:
        head = request_bytes("POST", "/v1/messages", headers, content_length=False)
        piece = b"x" * 65536
        await conn.send(head + (b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece))
        response = await conn.read_response(timeout=ANSWER_WITHIN)
        assert_gateway_error(response, 401, "authentication_error")
        assert response.header("connection") == "close"
        assert await conn.wait_closed_by_peer(timeout=ANSWER_WITHIN)
    assert gateway.mock.requests == []
    rows = gateway.query("SELECT COUNT(*) FROM usage")
    assert rows[0][0] == 0


async def test_an_absolute_form_target_is_refused_before_its_body_is_read_too(gateway):
    headers = {"x-api-key": "sk-apx-not-a-key", "content-type": "application/json", "content-length": str(BIG)}
    async with await connect(gateway) as conn:
        await conn.send(request_bytes("POST", "http://gateway.example/v1/messages", headers, content_length=False))
        response = await conn.read_response(timeout=ANSWER_WITHIN)
        assert_gateway_error(response, 401, "authentication_error")
    assert gateway.mock.requests == []


async def send_in_pieces(env, key: str, text: str):
    """A ~100 kB Messages request whose body follows its head in a second write (so the head is judged first)."""
    body = request_bytes("POST", "/v1/messages", {"x-api-key": key},
                         json_body={"model": "claude-haiku-4-5-20251001", "max_tokens": 16,
                                    "messages": [{"role": "user", "content": text + " " + "y" * 100_000}]})
    async with await connect(env) as conn:
        cut = body.index(b"\r\n\r\n") + 10
        await conn.send(body[:cut])
        await asyncio.sleep(0.05)
        await conn.send(body[cut:])
        return await conn.read_response()


async def test_a_valid_key_still_sends_its_body_in_pieces(gateway):
    """The head check admits a known key: a body that arrives in several pieces is read and served."""
    response = await send_in_pieces(gateway, gateway.key, "in pieces")
    assert response.status == 200 and "in pieces" in response.json()["content"][0]["text"]
    assert len(gateway.mock.requests) == 1


class HooklessAuth:
    """A third-party auth plugin without check_head: it sees the body before it decides."""

    def __init__(self, ctx) -> None:
        pass

    async def authenticate(self, request):
        return None             # not this plugin's: the keys plugin after it decides


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_unvouched_request_may_send_only_the_smaller_body(gateway_env, mock_upstream, monkeypatch, framing):
    """Behind an auth plugin that cannot judge a head, a keyless upload is cut off at max_unvouched_body_bytes
    (413, connection closed) instead of being buffered up to max_body_bytes; a request under that limit is
    authenticated from its body as before."""
    entry = EntryPoint("hookless", f"{__name__}:HooklessAuth", AUTH_GROUP)
    real_discover = plugin_host.discover
    monkeypatch.setattr(plugin_host, "discover",
                        lambda group: {**real_discover(group), **({"hookless": entry} if group == AUTH_GROUP else {})})
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(auth_plugins=["hookless", "keys"], max_unvouched_body_bytes=256 * 1024)
    headers = {"content-type": "application/json"}
    if framing == "chunked":
        headers["transfer-encoding"] = "chunked"
    else:
        headers["content-length"] = str(BIG)
    piece = b"x" * 65536
    async with await connect(gateway_env) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", headers, content_length=False))
        for _ in range(5):      # 320 KiB: past the unvouched limit, far below max_body_bytes
            await conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
        response = await conn.read_response(timeout=ANSWER_WITHIN)
        assert_gateway_error(response, 413, "request_too_large")
        assert str(256 * 1024) in response.json()["error"]["message"]
        assert await conn.wait_closed_by_peer(timeout=ANSWER_WITHIN)
    # A body that fits, sent in pieces, reaches authentication and is served for a real key.
    response = await send_in_pieces(gateway_env, key, "fits")
    assert response.status == 200 and "fits" in response.json()["content"][0]["text"]
    assert len(mock_upstream.requests) == 1


async def test_a_disabled_key_is_refused_from_the_head_with_its_reason(gateway_env, mock_upstream):
    key = gateway_env.add_key("bob")
    gateway_env.add_channel("main", mock_upstream)
    gateway_env.conn.execute("UPDATE keys SET enabled = 0 WHERE name = 'bob'")
    gateway_env.conn.commit()
    await gateway_env.start()
    async with await connect(gateway_env) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "content-length": str(BIG)},
                                      content_length=False) + b"{" * 1000)
        response = await conn.read_response(timeout=ANSWER_WITHIN)
        assert_gateway_error(response, 401, "authentication_error", "disabled")
    assert mock_upstream.requests == []


# -- descriptors and the connection cap ---------------------------------------------------------------------------

async def idle_connections(env, n: int, *, served: bool) -> list[RawConnection]:
    """n open connections doing nothing: after one request each (keep-alive) or before any."""
    conns = []
    for _ in range(n):
        conn = await connect(env)
        if served:
            assert (await conn.request("GET", "/health")).status == 200
        conns.append(conn)
    return conns


async def test_at_the_cap_idle_connections_are_shed_first_and_the_log_says_so(gateway_env, mock_upstream, caplog):
    key = gateway_env.key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(max_connections=3)
    busy = await connect(gateway_env)
    await busy.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "x-mock-scenario": "event-delay=0.1"},
                                  json_body={"model": "claude-haiku-4-5-20251001", "max_tokens": 16, "stream": True,
                                             "messages": [{"role": "user", "content": "a slow stream"}]}))
    busy_head = await busy.read_head()
    assert busy_head.status == 200
    idle = await idle_connections(gateway_env, 1, served=True) + await idle_connections(gateway_env, 1, served=False)
    async with await connect(gateway_env) as newcomer:                 # the fourth: room is made for it
        assert (await newcomer.request("GET", "/health")).status == 200
    # One idle connection made room (a sixteenth of the cap at a time, at least one); the other still serves.
    watches = {asyncio.ensure_future(conn.wait_closed_by_peer(timeout=5)): conn for conn in idle}
    done, pending = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
    [closed] = done
    assert closed.result() is True
    for watch in pending:
        watch.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    [survivor] = [watches[w] for w in pending]
    assert (await survivor.request("GET", "/health")).status == 200
    body = b"".join([piece async for piece in busy.iter_chunks(busy_head)])    # the busy one was left alone
    assert body.rstrip().endswith(b'data: {"type":"message_stop"}')
    busy.close()
    for conn in idle:
        conn.close()
    assert "connection cap of 3 reached: closed 1 idle connections" in caplog.text


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_a_503(gateway_env, mock_upstream):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(max_connections=2)
    streams = []
    for _ in range(2):
        conn = await connect(gateway_env)
        await conn.send(request_bytes("POST", "/v1/messages",
                                      {"x-api-key": key, "x-mock-scenario": "event-delay=0.1"},
                                      json_body={"model": "claude-haiku-4-5-20251001", "max_tokens": 16,
                                                 "stream": True, "messages": [{"role": "user", "content": "busy"}]}))
        assert (await conn.read_head()).status == 200
        streams.append(conn)
    async with await connect(gateway_env) as refused:
        response = await refused.read_response(timeout=ANSWER_WITHIN)
        assert_gateway_error(response, 503, "overloaded_error", "connection limit")
        assert response.header("retry-after") == "1" and response.header("connection") == "close"
        assert await refused.wait_closed_by_peer(timeout=ANSWER_WITHIN)
    for conn in streams:
        conn.abort()


def low_descriptor_limit() -> None:
    """In the server's process before exec: a soft limit of 256, a hard one of 320."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 320))


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads the server's limits from Linux /proc")
async def test_idle_connections_beyond_the_descriptor_limit_do_not_lock_anyone_out(tmp_path, mock_upstream):
    """A server started with a soft limit of 256 descriptors raises it to the hard limit (320), caps its client
    connections to fit (128: each may also need an upstream socket), and sheds idle ones for newcomers: 400 idle
    connections would otherwise exhaust the descriptors, and accept() then fail for everyone."""
    db = str(tmp_path / "gateway.db")
    key = prepare_db(db, mock_upstream.base_url)
    async with ServeProcess(tmp_path, db, preexec_fn=low_descriptor_limit) as server:
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == ["320", "320"], line
        idle = []
        for _ in range(400):
            idle.append(await RawConnection.open("127.0.0.1", server.port))
        async with sdk_client(server.base_url, key) as client:
            reply = await client.messages.create(model=MODEL, max_tokens=16,
                                                 messages=[{"role": "user", "content": "still served"}])
        assert "still served" in reply.content[0].text
        for conn in idle:
            conn.abort()
        assert await server.stop(signal.SIGTERM) == 0
    assert "connection cap of 128 reached: closed" in server.stderr
