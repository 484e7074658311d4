"""The gateway's HTTP/1.1 server over raw sockets (RawConnection): exact bytes in, exact bytes out.

Pipelining and keep-alive (client side and the upstream pool), limits (413, 431), timeouts (head, body, idle),
the errors the gateway makes itself, which headers cross to the upstream, and flow control: a client that leaves
mid-stream, a client that reads slowly, an HTTP/1.0 client. Every test checks what the client got, what the mock
upstream received and, where a request was metered, the usage row.
"""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

from tests.support.gateway_env import NO_COOLDOWNS
from tests.support.mock_replies import REPLY_TAIL
from tests.support.mock_upstream import MOCK_API_KEY
from tests.support.gateway_requests import REQUEST_ID
from tests.support.gateway_requests import assert_error as assert_gateway_error
from tests.support.rawhttp import RawConnection, chunked, parse_sse, request_bytes
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, chunk, message_start, text_events

MODEL = "claude-haiku-4-5-20251001"
MAX_BODY = 32 * 1024 * 1024


def message(text: str = "hi", **fields) -> dict:
    return {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": text}], **fields}


def expected_text(text: str, turn: int = 1) -> str:
    return f"Echo: {text} (turn {turn}) {REPLY_TAIL}"


def sse_text(events: list) -> str:
    """The text a stream's text_delta events add up to."""
    pieces = []
    for name, data in events:
        if name == "content_block_delta":
            pieces.append(json.loads(data)["delta"].get("text", ""))
    return "".join(pieces)


async def connect(env) -> RawConnection:
    return await RawConnection.open(env.gateway.host, env.gateway.port)


@pytest.fixture
def start_gateway(gateway_env, mock_upstream):
    """Like the `gateway` fixture, with Settings overrides (timeouts, limits)."""
    async def start(**overrides):
        gateway_env.key = gateway_env.add_key("alice")
        gateway_env.add_channel("main", mock_upstream)
        gateway_env.mock = mock_upstream
        await gateway_env.start(**overrides)
        return gateway_env
    return start


# -- pipelining and keep-alive --------------------------------------------------------------------------------

async def test_pipelined_requests_answered_in_order(gateway):
    auth = {"x-api-key": gateway.key}
    batch = b"".join([
        request_bytes("POST", "/v1/messages", auth, json_body=message("first")),
        request_bytes("GET", "/health"),
        request_bytes("POST", "/v1/messages", auth, json_body=message("second", stream=True)),
        request_bytes("POST", "/v1/nowhere", auth, json_body=message("lost")),
        request_bytes("POST", "/v1/messages", auth, json_body=message("third")),
    ])
    async with await connect(gateway) as conn:
        await conn.send(batch)                                   # one write: all five requests at once
        responses = [await conn.read_response() for _ in range(5)]

    assert [r.status for r in responses] == [200, 200, 200, 404, 200]
    assert responses[0].json()["content"][0]["text"] == expected_text("first")
    assert responses[1].json() == {"status": "ok"}
    assert sse_text(responses[2].sse_events()) == expected_text("second")
    assert_gateway_error(responses[3], 404, "not_found_error")
    assert responses[4].json()["content"][0]["text"] == expected_text("third")
    ids = [r.header("request-id") for r in responses]
    assert all(REQUEST_ID.fullmatch(i) for i in ids) and len(set(ids)) == 5
    assert all(r.header("connection") != "close" for r in responses)

    # Upstream saw the three messages in order; each was metered under its own request id.
    assert [r.body["messages"][0]["content"] for r in gateway.mock.requests] == ["first", "second", "third"]
    rows = await gateway.usage_rows(3)
    assert [row["request_id"] for row in rows] == [ids[0], ids[2], ids[4]]
    assert [row["stream"] for row in rows] == [0, 1, 0]


async def test_pipelined_requests_split_mid_body_and_mid_head(gateway):
    """Bodies that arrive whole are taken straight from the parser's buffer, ones still
    arriving are framed by h11; either way the bytes after a body start the next request."""
    auth = {"x-api-key": gateway.key}
    padded = message("first", metadata={"user_id": "u" * 3000})   # a body that spans reads
    first = request_bytes("POST", "/v1/messages", auth, json_body=padded)
    second = request_bytes("POST", "/v1/messages", auth, json_body=message("second"))
    third = request_bytes("POST", "/v1/messages", auth, json_body=message("third"))
    batch = first + second + third
    cuts = [len(first) - 1500, len(first) + 20, len(first) + len(second) - 5, len(batch)]
    async with await connect(gateway) as conn:
        start = 0
        for cut in cuts:                                         # separate reads on the gateway's side
            await conn.send(batch[start:cut])
            start = cut
            await asyncio.sleep(0.05)
        responses = [await conn.read_response() for _ in range(3)]

    assert [r.status for r in responses] == [200, 200, 200]
    texts = [r.json()["content"][0]["text"] for r in responses]
    assert texts == [expected_text("first"), expected_text("second"), expected_text("third")]
    assert [r.body for r in gateway.mock.requests] == [padded, message("second"), message("third")]


async def test_a_client_pipelining_without_reading_holds_bounded_memory(gateway):
    """One client pipelines far more than any buffer while reading none of the answers. The gateway stops
    reading at its pipelining high-water mark, which holds across requests (else it would read, hold and re-copy
    the whole backlog), and stops answering while the client does not read (else answers pile up in memory).
    Once the client reads, every request is answered, in order."""
    from apertis_proxy.http import protocol
    count = 25_000
    request = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"        # 33 bytes: 0.8 MB in all
    conn = await connect(gateway)
    sender = asyncio.create_task(conn.send(request * count))
    await asyncio.sleep(1.0)
    [server_side] = gateway.gateway.state.connections
    backlog = len(server_side._h11.trailing_data[0])
    unsent = server_side.transport.get_write_buffer_size()
    assert backlog <= protocol._PIPELINE_HIGH_WATER + 256 * 1024, backlog
    assert unsent <= 2 * gateway.gateway.settings.write_high_water, unsent
    answered = 0
    tail = b""
    while answered < count:
        piece = await asyncio.wait_for(conn.reader.read(1 << 20), 30)
        assert piece, f"closed after {answered} answers"
        answered += (tail + piece).count(b"HTTP/1.1 200 OK\r\n") - tail.count(b"HTTP/1.1 200 OK\r\n")
        tail = piece[-20:]
    await sender
    conn.close()
    assert answered == count


async def test_keep_alive_reuses_one_client_and_one_upstream_connection(gateway):
    auth = {"x-api-key": gateway.key}
    async with await connect(gateway) as conn:
        for n, stream in enumerate([False, True, False, True]):
            response = await conn.request("POST", "/v1/messages", auth, json_body=message(f"n{n}", stream=stream))
            assert response.status == 200 and response.header("connection") != "close"
            text = sse_text(response.sse_events()) if stream else response.json()["content"][0]["text"]
            assert text == expected_text(f"n{n}")

    async with await connect(gateway) as conn:                   # another client, the same upstream connection
        response = await conn.request("POST", "/v1/messages", auth, json_body=message("other client"))
        assert response.json()["content"][0]["text"] == expected_text("other client")

    mock = gateway.mock
    assert len(mock.requests) == 5
    assert mock.connections_opened == 1                          # the pool kept its one connection alive
    assert {r.connection_id for r in mock.requests} == {1}
    assert len(await gateway.usage_rows(5)) == 5


# -- limits --------------------------------------------------------------------------------------------------

async def test_declared_oversized_body_is_refused_with_413(gateway):
    headers = {"x-api-key": gateway.key, "content-type": "application/json", "content-length": str(MAX_BODY + 1)}
    async with await connect(gateway) as conn:
        # The head and the first MiB of the body, as a real client would keep sending: the 413 must still arrive.
        await conn.send(request_bytes("POST", "/v1/messages", headers) + b"x" * (1024 * 1024))
        response = await conn.read_response()
        assert_gateway_error(response, 413, "request_too_large", str(MAX_BODY))
        assert response.header("connection") == "close"
        assert await conn.wait_closed_by_peer(timeout=5)
    assert gateway.mock.requests == []


async def test_chunked_body_growing_past_the_limit_is_refused_with_413(start_gateway):
    env = await start_gateway(max_body_bytes=1000)
    headers = {"x-api-key": env.key, "content-type": "application/json", "transfer-encoding": "chunked"}
    small = json.dumps(message("fits")).encode()
    assert len(small) < 1000
    async with await connect(env) as conn:                       # under the limit, chunked bodies are fine
        await conn.send(request_bytes("POST", "/v1/messages", headers) + chunked(small[:20], small[20:]))
        response = await conn.read_response()
        assert response.status == 200 and response.json()["content"][0]["text"] == expected_text("fits")

    async with await connect(env) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", headers) + b"258\r\n" + b"a" * 600 + b"\r\n")
        await conn.send(b"258\r\n" + b"b" * 600 + b"\r\n")      # 1200 bytes: over the limit, no end in sight
        response = await conn.read_response()
        assert_gateway_error(response, 413, "request_too_large", "1000")
        assert response.header("connection") == "close"
    assert [r.body["messages"][0]["content"] for r in env.mock.requests] == ["fits"]


@pytest.mark.parametrize("size", [70_000, 300_000])
async def test_oversized_headers_get_431(gateway, size):
    # 70 kB arrives in one read (h11 alone would accept a complete head that size); 300 kB arrives in pieces.
    headers = {"x-api-key": gateway.key, "x-padding": "p" * size}
    async with await connect(gateway) as conn:
        response = await conn.request("POST", "/v1/messages", headers, json_body=message())
        assert_gateway_error(response, 431, "request_too_large", "headers")
        assert response.header("connection") == "close"
    assert gateway.mock.requests == []


# -- errors the gateway makes itself --------------------------------------------------------------------------

async def test_malformed_and_empty_bodies_get_400(gateway):
    auth = {"x-api-key": gateway.key, "content-type": "application/json"}
    async with await connect(gateway) as conn:
        bad = await conn.request("POST", "/v1/messages", auth, b'{"model": "claude-haiku-4-5", "messages": [')
        assert_gateway_error(bad, 400, "invalid_request_error", "JSON")
        empty = await conn.request("POST", "/v1/messages", auth, b"")
        assert_gateway_error(empty, 400, "invalid_request_error", "empty")
        not_object = await conn.request("POST", "/v1/messages", auth, b"[1, 2]")
        assert_gateway_error(not_object, 400, "invalid_request_error")
        # A 400 keeps the connection usable.
        assert (await conn.request("POST", "/v1/messages", auth, json_body=message())).status == 200
    assert len(gateway.mock.requests) == 1
    rows = await gateway.usage_rows(4)
    assert [(r["status"], r["error_type"], r["reached_upstream"]) for r in rows[:3]] == [
        (400, "invalid_request_error", 0)] * 3


async def test_unknown_path_404_and_wrong_method_405(gateway):
    auth = {"x-api-key": gateway.key}
    async with await connect(gateway) as conn:
        for target in ("/v1/complete", "/v2/messages?beta=true", "/v1/messagesX", "/"):
            assert_gateway_error(await conn.request("POST", target, auth, json_body=message()), 404,
                                 "not_found_error")
        wrong = await conn.request("GET", "/v1/messages", auth)
        assert_gateway_error(wrong, 405, "invalid_request_error", "POST")
        assert wrong.header("allow") == "POST"
        put = await conn.request("PUT", "/v1/models", auth, b"{}")
        assert_gateway_error(put, 405, "invalid_request_error")
        assert put.header("allow") == "GET, HEAD"
    assert gateway.mock.requests == []


async def test_head_requests_get_the_head_only_and_the_connection_stays_usable(gateway):
    """A HEAD answer carries the head the GET would get and no body: body bytes would be read as the start of the
    next response on a keep-alive connection (they were, for every HEAD, errors included)."""
    auth = {"x-api-key": gateway.key}
    async with await connect(gateway) as conn:
        for target, status in (("/health", 200), ("/v1/models", 200), ("/v1/messages", 405), ("/nowhere", 404)):
            await conn.send(request_bytes("HEAD", target, auth))
            head = await conn.read_response(method="HEAD")
            assert head.status == status, target
            assert int(head.header("content-length")) > 0 and head.body == b"", target
            after = await conn.request("GET", "/health")                # the same connection, in step
            assert (after.status, after.json()) == (200, {"status": "ok"}), target
        models = await conn.request("GET", "/v1/models", auth)
    assert models.json()["data"]


async def test_bad_key_gets_401_without_reaching_upstream(gateway):
    async with await connect(gateway) as conn:
        for headers in ({"x-api-key": "sk-not-a-key"}, {"authorization": "Bearer sk-not-a-key"}, {}):
            response = await conn.request("POST", "/v1/messages", headers, json_body=message())
            assert_gateway_error(response, 401, "authentication_error")
    assert gateway.mock.requests == []


@pytest.mark.parametrize("gateway", [NO_COOLDOWNS], indirect=True)
async def test_request_id_on_every_response(gateway):
    """Successes, gateway errors, upstream errors and refusals before the body was read all carry one."""
    auth = {"x-api-key": gateway.key}
    gateway.mock.fail_next(529)
    responses = []
    async with await connect(gateway) as conn:
        responses.append(await conn.request("GET", "/health"))
        responses.append(await conn.request("POST", "/v1/messages", auth, json_body=message()))  # upstream 529
        responses.append(await conn.request("POST", "/v1/messages", auth, json_body=message()))
        responses.append(await conn.request("POST", "/v1/messages", auth, json_body=message(stream=True)))
        responses.append(await conn.request("POST", "/nope", auth))
        responses.append(await conn.request("GET", "/v1/messages", auth))
        responses.append(await conn.request("POST", "/v1/messages", auth, b"{"))
        responses.append(await conn.request("POST", "/v1/messages", {"x-api-key": "wrong"}, json_body=message()))
    async with await connect(gateway) as conn:
        responses.append(await conn.request("POST", "/v1/messages", {**auth, "x-big": "b" * 100_000}))
    async with await connect(gateway) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {**auth, "content-length": str(MAX_BODY + 5)}))
        responses.append(await conn.read_response())

    assert [r.status for r in responses] == [200, 529, 200, 200, 404, 405, 400, 401, 431, 413]
    ids = [r.header_values("request-id") for r in responses]
    assert all(len(i) == 1 and REQUEST_ID.fullmatch(i[0]) for i in ids), ids
    assert len({i[0] for i in ids}) == len(ids)
    for response in responses:
        if response.status >= 400:
            # An upstream's error body comes whole, with its own request_id (also in upstream-request-id);
            # the gateway's own errors carry the gateway's.
            expected = response.header("upstream-request-id") or response.header("request-id")
            assert response.json()["request_id"] == expected
    # The head has the gateway's own id, never the upstream's: that one is in the usage row (and in
    # upstream-request-id).
    upstream_ids = [r.request_id for r in gateway.mock.requests]
    assert len(upstream_ids) == 3
    assert not {responses[i].header("request-id") for i in (1, 2, 3)} & set(upstream_ids)
    assert [responses[i].header("upstream-request-id") for i in (2, 3)] == upstream_ids[1:]
    assert responses[1].json()["error"]["type"] == "overloaded_error"
    assert responses[1].json()["request_id"] == upstream_ids[0]       # the upstream's body, whole
    rows = {row["request_id"]: row for row in await gateway.usage_rows(4)}
    assert [rows[responses[i].header("request-id")]["upstream_request_id"] for i in (1, 2, 3)] == upstream_ids


# -- headers and query string -----------------------------------------------------------------------------------

async def test_headers_crossing_to_upstream(gateway):
    user_key = gateway.key
    sent = [
        ("x-api-key", user_key),
        ("authorization", f"Bearer {user_key}"),
        ("proxy-authorization", "Basic dXNlcjpwYXNz"),
        ("connection", "keep-alive, x-hop-secret, upgrade"),
        ("keep-alive", "timeout=30"),
        ("x-hop-secret", "listed in connection: hop-by-hop"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("upgrade", "h2c"),
        ("anthropic-beta", "b-one,b-two"),
        ("anthropic-workspace-id", "wrkspc_1"),
        ("x-claude-code-session-id", "sess-42"),
        ("x-custom-thing", "Keep Me, exactly"),
        ("user-agent", "claude-cli/2.1.0 (external, cli)"),
    ]                                                            # no anthropic-version at all
    async with await connect(gateway) as conn:
        response = await conn.request("POST", "/v1/messages?beta=true&trace=a%20b", sent, json_body=message())
        assert response.status == 200, response.body
        # A client that sends its own version: upstream still gets exactly one (the channel's).
        response = await conn.request("POST", "/v1/messages", [("x-api-key", user_key),
                                                               ("anthropic-version", "2026-10-21")],
                                      json_body=message())
        assert response.status == 200, response.body

    first, second = gateway.mock.requests
    assert first.target == "/v1/messages?beta=true&trace=a%20b"
    assert first.header_values("x-api-key") == [MOCK_API_KEY]   # the channel's key, the only credential
    for gone in ("authorization", "proxy-authorization", "keep-alive", "x-hop-secret", "proxy-connection",
                 "te", "upgrade"):
        assert gone not in first.headers, gone
    assert "x-hop-secret" not in first.headers.get("connection", "")
    assert user_key not in json.dumps(first.raw_headers)
    assert first.header_values("anthropic-version") == ["2023-06-01"]
    assert first.header_values("anthropic-beta") == ["b-one,b-two"]
    for name in ("x-claude-code-session-id", "x-custom-thing", "user-agent"):
        assert first.header_values(name) == [dict(sent)[name]], name
    assert "anthropic-workspace-id" not in first.headers       # who pays is the operator's choice
    assert first.headers["host"] == f"127.0.0.1:{gateway.mock.port}"
    assert second.header_values("anthropic-version") == ["2023-06-01"]
    assert second.header_values("x-api-key") == [MOCK_API_KEY] and "authorization" not in second.headers
    assert second.query == ""


async def test_connection_header_cannot_strip_the_gateways_own_upstream_lines(gateway):
    """Connection names hop-by-hop headers of the client's own request. Applied to the gateway's lines too, a
    client could strip the channel's credential (an upstream 401: the channel disabled for everyone) or the
    framing (its body read upstream as the next request on a pooled connection, answered to another user).
    Every Connection header counts, not only the last."""
    sent = [("x-api-key", gateway.key),
            ("connection", "x-api-key, content-length, x-drop-one"),
            ("connection", "host, anthropic-version, authorization, X-Drop-Two"),
            ("x-drop-one", "1"), ("x-drop-two", "2"), ("x-kept", "3")]
    async with await connect(gateway) as conn:
        for text in ("first", "second"):      # the second goes over the same pooled upstream connection
            response = await conn.request("POST", "/v1/messages", sent, json_body=message(text))
            assert response.status == 200, response.body
            assert response.json()["content"][0]["text"] == expected_text(text)
    for request in gateway.mock.requests:
        assert request.header_values("x-api-key") == [MOCK_API_KEY]
        assert request.header_values("anthropic-version") == ["2023-06-01"]
        assert request.headers["host"] == f"127.0.0.1:{gateway.mock.port}"
        assert request.header_values("content-length") == [str(len(request.raw_body))]
        assert "x-drop-one" not in request.headers and "x-drop-two" not in request.headers
        assert request.header_values("x-kept") == ["3"]
    assert len(gateway.mock.requests) == 2 and gateway.mock.connections_opened == 1
    [(enabled,)] = gateway.query("SELECT enabled FROM channels WHERE name = 'main'")
    assert enabled == 1


async def test_bearer_channel_gets_exactly_one_credential(gateway_env, mock_upstream):
    key = gateway_env.add_key("bob")
    gateway_env.add_channel("bearer", mock_upstream, options={"auth_header": "authorization"})
    await gateway_env.start()
    async with await connect(gateway_env) as conn:
        response = await conn.request("POST", "/v1/messages", {"x-api-key": key, "authorization": f"Bearer {key}"},
                                      json_body=message())
        assert response.status == 200, response.body
    upstream = mock_upstream.last_request
    assert upstream.header_values("authorization") == [f"Bearer {MOCK_API_KEY}"]
    assert "x-api-key" not in upstream.headers


# -- timeouts -------------------------------------------------------------------------------------------------

async def test_half_sent_head_times_out(start_gateway):
    env = await start_gateway(header_timeout=0.3)
    async with await connect(env) as conn:
        await conn.send(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: " + env.key.encode())
        try:
            response = await conn.read_response(timeout=5)
        except asyncio.IncompleteReadError:
            response = None                                      # closed without an answer: also acceptable
        if response is not None:
            assert_gateway_error(response, 408, "timeout_error")
            assert response.header("connection") == "close"
        assert await conn.wait_closed_by_peer(timeout=5)
    assert env.mock.requests == []


async def test_stalled_body_times_out(start_gateway):
    env = await start_gateway(body_timeout=0.3)
    body = json.dumps(message()).encode()
    async with await connect(env) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": env.key}, body)[:-10])
        response = await conn.read_response(timeout=5)
        assert_gateway_error(response, 408, "timeout_error")
        assert await conn.wait_closed_by_peer(timeout=5)
    assert env.mock.requests == []


async def test_idle_keep_alive_connection_is_closed(start_gateway):
    env = await start_gateway(keepalive_timeout=0.3)
    async with await connect(env) as conn:
        response = await conn.request("POST", "/v1/messages", {"x-api-key": env.key}, json_body=message())
        assert response.status == 200 and response.header("connection") != "close"
        assert await conn.wait_closed_by_peer(timeout=5)
    async with await connect(env) as conn:                       # a connection that never sends a byte
        assert await conn.wait_closed_by_peer(timeout=5)


# -- flow control -------------------------------------------------------------------------------------------------

async def test_client_leaving_mid_stream_is_read_to_its_end_and_metered(gateway):
    """The upstream bills what it generated: after the client left, the gateway reads the stream to its end
    (sending it nowhere), meters the final usage and keeps the upstream connection for the next request."""
    mock = gateway.mock
    headers = {"x-api-key": gateway.key, "x-mock-scenario": "event-delay=0.05"}
    async with await connect(gateway) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", headers,
                                      json_body=message("a long enough answer to leave early", stream=True)))
        head = await conn.read_head()
        assert head.status == 200
        received = b""
        async for piece in conn.iter_chunks(head):
            received += piece
            if b"content_block_delta" in received:
                break
        conn.abort()

    rows = await gateway.usage_rows(1)
    row = rows[0]
    served = mock.served[0]
    assert served["completed"] and mock.disconnects == 0
    assert row["interrupted"] == 1 and row["stream"] == 1 and row["status"] == 200
    assert row["input_tokens"] == served["usage"]["input_tokens"] > 0
    assert row["output_tokens"] == served["full_usage"]["output_tokens"] > 1
    assert row["upstream_request_id"] == mock.requests[0].request_id

    # The server is still up, and the same upstream connection serves the next request.
    async with await connect(gateway) as conn:
        response = await conn.request("POST", "/v1/messages", {"x-api-key": gateway.key}, json_body=message("next"))
        assert response.status == 200 and response.json()["content"][0]["text"] == expected_text("next")
    assert mock.connections_opened == 1
    assert (await gateway.usage_rows(2))[1]["interrupted"] == 0


async def test_upstream_cut_mid_stream_becomes_an_error_event_then_close(gateway):
    headers = {"x-api-key": gateway.key, "x-mock-scenario": "drop-after=6"}
    async with await connect(gateway) as conn:
        response = await conn.request("POST", "/v1/messages", headers, json_body=message("cut", stream=True))
        assert response.status == 200 and response.is_chunked
        assert await conn.wait_closed_by_peer(timeout=5)          # the head promised keep-alive; the close says "over"
    events = response.sse_events()
    names = [name for name, _ in events]
    assert names[:6] == ["message_start", "content_block_start", "ping", "content_block_delta",
                         "content_block_delta", "content_block_delta"]
    assert names[6:] == ["error"]                                # whole events, then the error, nothing glued on
    error = json.loads(events[-1][1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    [row] = await gateway.usage_rows(1)
    assert row["status"] == 200 and row["error_type"] == "api_error"
    assert row["input_tokens"] == gateway.mock.served[0]["usage"]["input_tokens"] > 0


async def test_stream_abandoned_before_its_first_byte_stops_upstream(gateway):
    # Claude Code's Esc while waiting for the first token: nobody will read the
    # stream, so the upstream generation is stopped and the request still metered.
    mock = gateway.mock
    headers = {"x-api-key": gateway.key, "x-mock-scenario": "first-byte-delay=5"}
    async with await connect(gateway) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", headers, json_body=message("never mind", stream=True)))
        await mock.wait_until(lambda: len(mock.requests) == 1)
        conn.close()

    await mock.wait_until(lambda: mock.requests[0].disconnected.is_set(), timeout=3)
    row = (await gateway.usage_rows(1))[0]
    assert row["interrupted"] == 1 and row["status"] == 499 and row["stream"] == 1
    assert row["error_type"] == "client_closed_request" and row["channel_name"] == "main"


async def test_json_request_completes_after_its_client_half_closed(gateway):
    # A FIN is ambiguous (half-close or gone); a JSON answer is cheap to finish
    # and its usage is then exact, so the gateway waits for it and still answers.
    mock = gateway.mock
    headers = {"x-api-key": gateway.key, "x-mock-scenario": "first-byte-delay=0.3"}
    async with await connect(gateway) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", headers, json_body=message("finish anyway")))
        conn.writer.write_eof()
        response = await conn.read_response()
    assert response.status == 200 and response.json()["content"][0]["text"] == expected_text("finish anyway")
    row = (await gateway.usage_rows(1))[0]
    assert row["interrupted"] == 0 and row["output_tokens"] == mock.served[0]["usage"]["output_tokens"] > 0


async def _slow_connection(env) -> RawConnection:
    """A client with a tiny receive buffer, so unread data backs up into the gateway at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (env.gateway.host, env.gateway.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    return RawConnection(reader, writer)


async def _settled(read, interval: float = 0.2, timeout: float = 10.0):
    """Poll `read()` until two readings `interval` apart agree; that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = read()
    while loop.time() < deadline:
        await asyncio.sleep(interval)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError("value never settled")


async def test_slow_reader_pauses_the_upstream_and_gets_everything(gateway):
    # About 20 MB of SSE in 150k events: more than the kernel buffers on the way can absorb, so once the client
    # stops reading the gateway must stop reading upstream and the mock's writes block.
    deltas = 150_000
    mock = gateway.mock
    conn = await _slow_connection(gateway)
    async with conn:
        await conn.send(request_bytes("POST", "/v1/messages",
                                      {"x-api-key": gateway.key, "x-mock-scenario": f"message-deltas={deltas}"},
                                      json_body=message("bulk", stream=True)))
        head = await conn.read_head(timeout=30)
        assert head.status == 200

        await mock.wait_until(lambda: mock.served and mock.served[0]["events_sent"] > 0)
        stalled_at = await _settled(lambda: mock.served[0]["events_sent"])
        assert not mock.served[0]["completed"] and stalled_at < deltas
        client_side = [c for c in gateway.gateway.state.connections if c.busy]
        assert len(client_side) == 1 and client_side[0].flow.write_paused
        # What the gateway holds for this client is bounded by the write high-water mark, not the stream.
        assert client_side[0].transport.get_write_buffer_size() < 1024 * 1024

        body = b"".join([piece async for piece in conn.iter_chunks(head, timeout=30)])

    assert mock.served[0]["completed"]
    events = parse_sse(body)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("message_delta") == deltas
    assert all(json.loads(data)["type"] == name for name, data in events)
    assert sse_text(events) == expected_text("bulk")
    rows = await gateway.usage_rows(1)
    assert rows[0]["output_tokens"] == mock.served[0]["usage"]["output_tokens"] > 1
    assert rows[0]["interrupted"] == 0


async def test_slow_reader_pauses_a_stream_passed_on_chunk_by_chunk(scripted):
    """Events that come one chunk per read go out as they came (no decoding, no framing again); a client that
    stops reading still stops the gateway reading upstream, and then gets every event, metered."""
    await scripted.start()
    block_start, delta, block_stop, message_delta = text_events("x" * 16_000, output_tokens=1200)
    count = 1200                                # about 19 MB: more than the kernel buffers on the way absorb
    scripted.channel.queue([HEAD_SSE, chunk(message_start(7)), chunk(block_start), *[chunk(delta)] * count,
                            chunk(block_stop), chunk(message_delta), chunk(MESSAGE_STOP), b"0\r\n\r\n"])
    conn = await _slow_connection(scripted)
    async with conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": scripted.key},
                                      json_body=message("paced", stream=True)))
        head = await conn.read_head(timeout=30)
        assert head.status == 200
        client_side = [c for c in scripted.gateway.state.connections if c.busy]
        assert len(client_side) == 1
        flow = client_side[0].flow
        for _ in range(300):
            if flow.write_paused:
                break
            await asyncio.sleep(0.05)
        await _settled(client_side[0].transport.get_write_buffer_size)
        # Held back by the gateway's write high-water mark, not by the stream's size.
        assert flow.write_paused and client_side[0].transport.get_write_buffer_size() < 1024 * 1024
        body = b"".join([piece async for piece in conn.iter_chunks(head, timeout=30)])
    events = parse_sse(body)
    assert [name for name, _ in events] == ["message_start", "content_block_start", *["content_block_delta"] * count,
                                            "content_block_stop", "message_delta", "message_stop"]
    assert body == message_start(7) + block_start + delta * count + block_stop + message_delta + MESSAGE_STOP
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"], row["interrupted"]) == (7, 1200, 0)


async def test_http10_client_gets_a_close_delimited_stream(gateway):
    body = json.dumps(message("old client", stream=True)).encode()
    head = (f"POST /v1/messages HTTP/1.0\r\nhost: 127.0.0.1\r\nx-api-key: {gateway.key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    async with await connect(gateway) as conn:
        await conn.send(head + body)
        response = await conn.read_head()
        assert response.status == 200
        assert response.header("transfer-encoding") is None and response.header("content-length") is None
        assert response.header("connection") == "close"
        data = await conn.read_until_eof()                       # the end of the body is the close
    events = parse_sse(data)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert sse_text(events) == expected_text("old client")
    rows = await gateway.usage_rows(1)
    assert rows[0]["output_tokens"] == gateway.mock.served[0]["usage"]["output_tokens"] > 1


async def test_http10_client_gets_a_plain_json_answer(gateway):
    body = json.dumps(message("old json")).encode()
    head = (f"POST /v1/messages HTTP/1.0\r\nx-api-key: {gateway.key}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    async with await connect(gateway) as conn:
        await conn.send(head + body)
        response = await conn.read_response()
        assert response.status == 200 and response.header("connection") == "close"
        assert response.json()["content"][0]["text"] == expected_text("old json")
        assert await conn.wait_closed_by_peer(timeout=5)


async def test_health(gateway):
    async with await connect(gateway) as conn:
        response = await conn.request("GET", "/health")
    assert response.status == 200 and response.json() == {"status": "ok"}
    assert response.header("content-type") == "application/json"
    assert REQUEST_ID.fullmatch(response.header("request-id"))
    assert gateway.mock.requests == []
    assert await gateway.usage_rows(0) == []


async def test_stream_ended_without_message_stop_gets_an_error_event(gateway_env):
    # An upstream (or a proxy in front of it) that ends the body cleanly but early:
    # the client must not take the partial message for a complete one.
    start = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
             b'"role":"assistant","content":[],"model":"claude-haiku-4-5-20251001","stop_reason":null,'
             b'"stop_sequence":null,"usage":{"input_tokens":7,"output_tokens":1}}}\n\n')

    async def upstream(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(start) + start + b"\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    try:
        key = gateway_env.add_key("alice")
        gateway_env.add_channel("cut", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        await gateway_env.start()
        async with await connect(gateway_env) as conn:
            response = await conn.request("POST", "/v1/messages", {"x-api-key": key},
                                          json_body=message("partial", stream=True))
        names = [name for name, _ in parse_sse(response.body)]
        assert names == ["message_start", "error"]
        row = (await gateway_env.usage_rows(1))[0]
        assert row["error_type"] == "api_error" and row["input_tokens"] == 7
    finally:
        server.close()


class _RecordingTransport:
    """A client transport that notes each write call (what one socket call sends) and passes it on."""

    def __init__(self, transport, log: list) -> None:
        self._transport = transport
        self.log = log

    def write(self, data) -> None:
        self.log.append(bytes(data))
        self._transport.write(data)

    def writelines(self, parts) -> None:
        parts = list(parts)
        self.log.append(b"".join(parts))
        self._transport.writelines(parts)

    def __getattr__(self, name):
        return getattr(self._transport, name)


@pytest.mark.parametrize("scenario,paced", [("", False), ("event-delay=0.02", True)], ids=["whole", "paced"])
async def test_stream_end_goes_out_with_the_last_events(gateway, monkeypatch, scenario, paced):
    """The stream's final events and the end of the chunked body leave in one write (one socket call and one
    wake-up of the client less per stream); a stream that came whole with the upstream's head leaves in the
    write of our head.  The bytes are the same as ever."""
    from apertis_proxy.http.protocol import HttpConnection
    writes: list[bytes] = []
    made = HttpConnection.connection_made

    def recording(self, transport):
        made(self, transport)
        self.transport = _RecordingTransport(self.transport, writes)
    monkeypatch.setattr(HttpConnection, "connection_made", recording)

    headers = {"x-api-key": gateway.key, **({"x-mock-scenario": scenario} if scenario else {})}
    async with await connect(gateway) as conn:
        response = await conn.request("POST", "/v1/messages", headers, json_body=message("one write", stream=True))
    assert response.status == 200 and response.is_chunked
    events = response.sse_events()
    assert [name for name, _ in events][-1] == "message_stop"
    assert sse_text(events) == expected_text("one write")
    assert writes[-1].endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n\r\n0\r\n\r\n'), \
        writes[-1][-200:]
    if paced:       # the head and the early events went out as they came; only the last write ends the body
        assert len(writes) > 3 and not any(w.endswith(b"0\r\n\r\n") for w in writes[:-1])
    else:
        assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    [row] = await gateway.usage_rows(1)
    assert row["interrupted"] == 0 and row["error_type"] is None
    assert row["output_tokens"] == gateway.mock.served[0]["usage"]["output_tokens"] > 1


async def test_content_length_with_transfer_encoding_is_refused_and_closed(gateway):
    """Both framings in one request is the request-smuggling shape: a front end framing by Content-Length would
    see one request where the gateway (framing by Transfer-Encoding) saw two. Refused with a 400 and the
    connection closed: the bytes after it are never read as a request."""
    smuggled = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
    head = (b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: " + gateway.key.encode() +
            b"\r\ncontent-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(smuggled))
    async with await connect(gateway) as conn:
        await conn.send(head + smuggled)
        response = await conn.read_response()
        assert_gateway_error(response, 400, "invalid_request_error", "Transfer-Encoding")
        assert await conn.wait_closed_by_peer(timeout=5)
        assert b"smuggled" not in response.raw
    assert gateway.mock.requests == []


async def test_absolute_form_target_other_http_versions_and_error_wording(gateway):
    """RFC 9112: a server must accept the absolute-form target; HTTP/2.0 on an HTTP/1.1 connection is a 505;
    a malformed head is named without Python's repr of the bytes."""
    async with await connect(gateway) as conn:
        response = await conn.request("POST", f"http://127.0.0.1:{gateway.gateway.port}/v1/messages?x=1",
                                      {"x-api-key": gateway.key}, json_body=message("absolute"))
        assert response.status == 200 and response.json()["content"][0]["text"] == expected_text("absolute")
    assert gateway.mock.requests[-1].path == "/v1/messages" and gateway.mock.requests[-1].query == "x=1"
    async with await connect(gateway) as conn:
        await conn.send(b"GET /health HTTP/2.0\r\nhost: x\r\n\r\n")
        assert_gateway_error(await conn.read_response(method="GET"), 505, "invalid_request_error", "HTTP/1.1")
    async with await connect(gateway) as conn:
        await conn.send(b"GET /health HTTP/1.1\r\nhost: x\r\nx-foo: a\x00b\r\n\r\n")
        body = assert_gateway_error(await conn.read_response(method="GET"), 400, "invalid_request_error",
                                    "malformed HTTP request")
        assert "bytearray" not in body["error"]["message"] and "x-foo" not in body["error"]["message"].lower()
