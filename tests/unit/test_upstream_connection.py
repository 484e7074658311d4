"""UpstreamConnection against a scripted upstream on a real socket: response
heads (with and without interim 1xx responses, split anywhere), keep-alive
decisions, and malformed heads."""
from __future__ import annotations

import asyncio

import pytest

from apertis_proxy.upstream.connection import Phase, UpstreamError
from tests.support.scripted_upstream import BODY, OK, REQUEST_HEADERS, ScriptedUpstream, connect, exchange


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


@pytest.mark.parametrize("script", [
    [OK],
    [b"HTTP/1.1 100 Continue\r\n\r\n", OK],
    [b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n" + OK],
    bytewise(b"HTTP/1.1 100 Continue\r\n\r\n" + OK),
    bytewise(OK),
], ids=["plain", "100-then-200", "103-and-200-in-one-read", "1xx-byte-by-byte", "byte-by-byte"])
async def test_final_response_after_any_interim_responses(script):
    async with ScriptedUpstream([script, [OK]]) as upstream:
        conn = await connect(upstream.port)
        assert await exchange(conn) == (200, BODY)
        # The same connection carries the next request with a fresh h11.
        assert conn.recycle()
        assert await exchange(conn) == (200, BODY)
        assert len(upstream.requests) == 2
        assert upstream.requests[0].startswith(b"POST /v1/messages HTTP/1.1\r\nhost: upstream\r\n")
        conn.close()


async def test_the_phase_follows_the_exchange_and_decides_reuse():
    head, body = OK.split(b"\r\n\r\n")
    async with ScriptedUpstream([[head + b"\r\n\r\n", body], [OK]]) as upstream:
        conn = await connect(upstream.port)
        assert conn.phase is Phase.IDLE and not conn.reusable
        conn.send_request(b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
        assert conn.phase is Phase.AWAITING_HEAD
        assert (await conn.read_head(5.0)).status == 200
        assert conn.phase is Phase.READING_BODY and not conn.reusable      # the body came in a later write
        assert await conn.read_all(5.0, 1 << 20) == BODY
        assert conn.phase is Phase.DONE and conn.reusable
        assert conn.recycle() and conn.phase is Phase.IDLE
        assert await exchange(conn) == (200, BODY)
        conn.close()
        assert not conn.reusable


async def test_connection_close_is_not_reused():
    closing = OK.replace(b"content-type", b"connection: close\r\ncontent-type", 1)
    async with ScriptedUpstream([[closing]]) as upstream:
        conn = await connect(upstream.port)
        assert await exchange(conn) == (200, BODY)
        assert not conn.reusable
        assert not conn.recycle()
        conn.close()


@pytest.mark.parametrize("garbage", [b"garbage\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\nnot http\r\n\r\n"])
async def test_malformed_head_is_an_upstream_error(garbage):
    async with ScriptedUpstream([[garbage]]) as upstream:
        conn = await connect(upstream.port)
        conn.send_request(b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
        with pytest.raises(UpstreamError) as err:
            await conn.read_head(5.0)
        assert err.value.phase == "head"
        assert "invalid HTTP from upstream" in str(err.value)
        assert conn.closed


async def test_read_timeout_between_bytes():
    async with ScriptedUpstream([[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345"]]) as upstream:
        conn = await connect(upstream.port)
        conn.send_request(b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
        head = await conn.read_head(5.0)
        assert head.status == 200
        with pytest.raises(UpstreamError) as err:
            await conn.read_all(0.2, 1 << 20)
        assert err.value.timeout and err.value.phase == "body"
        assert conn.closed


@pytest.mark.parametrize("pieces", [1, 7], ids=["one-read", "several-reads"])
async def test_read_all_joins_a_body_in_pieces_and_enforces_its_limit(pieces):
    body = bytes(range(256)) * 40            # 10,240 bytes
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    cut = len(body) // pieces
    script = [head] + [body[i * cut:(i + 1) * cut if i < pieces - 1 else None] for i in range(pieces)]
    async with ScriptedUpstream([script, script]) as upstream:
        conn = await connect(upstream.port)
        conn.send_request(b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
        assert (await conn.read_head(5.0)).status == 200
        assert await conn.read_all(5.0, len(body)) == body     # exactly at the limit
        assert conn.recycle()
        conn.send_request(b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
        await conn.read_head(5.0)
        with pytest.raises(UpstreamError) as err:
            await conn.read_all(5.0, len(body) - 1)
        assert err.value.phase == "body" and "larger than" in str(err.value)
        assert conn.closed


async def test_read_all_resumes_a_body_paused_at_the_high_water_mark():
    """A body that queued past the high-water mark before read_all() was called
    paused the socket; read_all() must resume it and return every byte."""
    body = bytes(range(256)) * 4096          # 1 MiB, well past the 256 KB mark
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    async with ScriptedUpstream([[head + body]]) as upstream:
        conn = await connect(upstream.port)
        conn.send_request(b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
        assert (await conn.read_head(5.0)).status == 200
        for _ in range(100):                # let the body queue up to the mark
            if not conn._flow.reading:
                break
            await asyncio.sleep(0.01)
        assert not conn._flow.reading, "the queue never reached the high-water mark"
        assert await asyncio.wait_for(conn.read_all(5.0, 1 << 24), 10) == body
        conn.close()


def sse_body(events: int, size: int) -> bytes:
    event = b"event: content_block_delta\ndata: " + b"x" * size + b"\n\n"
    chunk = b"%x\r\n" % len(event) + event + b"\r\n"
    return chunk * events + b"0\r\n\r\n"


@pytest.mark.parametrize("taken_first", [False, True], ids=["pump-takes-backlog", "caller-takes-buffered"])
async def test_stream_paused_at_high_water_before_the_consumer_resumes(taken_first):
    """A body that piles up past the queue's high-water mark before the consumer
    arrives stops the socket being read; the consumer's pump must start it again."""
    body = sse_body(events=400, size=2000)          # ~800 KB: far past 256 KB
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    async with ScriptedUpstream([[head + body]]) as upstream:
        conn = await connect(upstream.port)
        conn.send_request(b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
        assert (await conn.read_head(5.0)).status == 200
        for _ in range(100):                          # let the queue fill and reading pause
            if not conn._flow.reading:
                break
            await asyncio.sleep(0.01)
        assert not conn._flow.reading
        got = [b"".join(conn.buffered())] if taken_first else []
        await asyncio.wait_for(conn.pump(lambda piece: got.append(piece) or True, 5.0), 10.0)
        assert b"".join(got).count(b"event: content_block_delta") == 400
        assert conn.reusable
        conn.close()
