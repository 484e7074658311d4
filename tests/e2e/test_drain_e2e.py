"""A stream whose client left is read on (relay.drain_stream) for its final usage, within the drain's bounds.

A real gateway (in process, real sockets, the SQLite ledger) and a tiny upstream on 127.0.0.1 that writes exact
bytes and holds the rest of its stream until the client has gone."""
from __future__ import annotations

import asyncio


from apertis_proxy.gateway import relay
from tests.support.local_server import LocalServer
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, chunk, event, message_start, text_events
from tests.support.scripted_gateway import CHANNEL_KEY, ask

FINAL_OUTPUT = 4321


class HeldUpstream(LocalServer):
    """Answers one stream: its opening at once, the rest (`tail`) only once `go` is set."""

    def __init__(self, opening: list[bytes], tail: list[bytes]) -> None:
        self.opening, self.tail = opening, tail
        self.go = asyncio.Event()
        self.done = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            for piece in self.opening:
                writer.write(piece)
            await writer.drain()
            await self.go.wait()
            for piece in self.tail:
                if isinstance(piece, float):
                    await asyncio.sleep(piece)
                    continue
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.done.set()
            writer.close()


def _delta(text: str) -> bytes:
    return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": text}})


async def _leave_after_message_start(gateway_env, key: str) -> None:
    """A client (Claude Code's Esc) that reads the head and the opening events, then resets the connection."""
    conn = await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port)
    try:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key}, json_body=ask()))
        head = await conn.read_head()
        assert head.status == 200
        seen = b""
        async for piece in conn.iter_chunks(head):
            seen += piece
            if b"content_block_start" in seen:
                break
    finally:
        conn.abort()


async def test_a_drain_within_its_bounds_meters_the_final_usage(gateway_env, monkeypatch):
    """A client that leaves after the opening events (Claude Code's Esc), a stream that ends within the drain's
    bounds: its final usage is what the row holds."""
    monkeypatch.setattr(relay, "DRAIN_SECONDS", 5.0)
    block_start = text_events("x")[0]
    opening = [HEAD_SSE, chunk(message_start(input_tokens=12)), chunk(block_start)]
    final = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                    "usage": {"output_tokens": FINAL_OUTPUT}})
    tail = [chunk(_delta("done")), chunk(event("content_block_stop", {"type": "content_block_stop", "index": 0})),
            chunk(final), chunk(MESSAGE_STOP), b"0\r\n\r\n"]
    async with HeldUpstream(opening, tail) as upstream:
        key = gateway_env.add_key("alice")
        gateway_env.add_channel("main", upstream.base_url, api_key=CHANNEL_KEY)
        await gateway_env.start()
        await _leave_after_message_start(gateway_env, key)
        upstream.go.set()
        [row] = await gateway_env.usage_rows(1, timeout=10.0)
    assert (row["interrupted"], row["input_tokens"], row["output_tokens"]) == (1, 12, FINAL_OUTPUT)
