"""SSE framing the gateway reads through: CRLF, CR and LF line endings cut at their worst places, comments,
chunk extensions and trailers are forwarded byte for byte and metered (the splicer and the chunked decoder end to
end: in-process gateway, real sockets, the SQLite ledger, a ScriptedChannel writing exact bytes)."""
from __future__ import annotations

import json

import pytest

from tests.support.scripted_channel import HEAD_SSE, chunk
from tests.support.scripted_gateway import ask, post

MODEL = "claude-haiku-4-5-20251001"


def _events(eol: bytes) -> list[bytes]:
    def ev(name: str, data: dict) -> bytes:
        return b"event: " + name.encode() + eol + b"data: " + json.dumps(data, ensure_ascii=False).encode() + eol + eol
    return [
        b": a comment first" + eol + eol,
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_awk", "type": "message", "role": "assistant", "model": MODEL, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 77, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "żółw 🐢 error message_delta"}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": 33, "server_tool_use": {"web_search_requests": 1}}}),
        ev("message_stop", {"type": "message_stop"}),
    ]


def _cuts(stream: bytes, eol: bytes) -> list[bytes]:
    """The stream cut in the worst places: inside each line ending, inside `data:`, inside UTF-8 characters."""
    points = set()
    start = 0
    while (at := stream.find(eol, start)) >= 0:
        points.add(at + 1)                          # between \r and \n (CRLF), or just after the ending
        start = at + len(eol)
    for marker in (b"data: {\"type\":\"message_delta", b"data: {\"type\": \"message_delta", "🐢".encode(),
                   "ż".encode()):
        at = stream.find(marker)
        if at >= 0:
            points.update({at + 3, at + 2, at + len(marker) - 1})
    points = sorted(p for p in points if 0 < p < len(stream))
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]


@pytest.mark.parametrize("eol", [b"\r\n", b"\r", b"\n"], ids=["crlf", "cr", "lf"])
async def test_events_cut_at_their_worst_places_are_forwarded_whole_and_metered(scripted, eol):
    await scripted.start()
    events = _events(eol)
    stream = b"".join(events)
    scripted.channel.queue([HEAD_SSE, *(chunk(p) for p in _cuts(stream, eol)), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200
    assert response.body == stream
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["cache_read_input_tokens"], row["output_tokens"],
            row["web_search_requests"], row["error_type"]) == (77, 5, 33, 1, None)


async def test_chunk_extensions_and_trailers_are_read_through(scripted):
    await scripted.start()
    events = _events(b"\n")
    pieces = [b"%x;ext=\"a b\"\r\n%s\r\n" % (len(e), e) for e in events]
    scripted.channel.queue([HEAD_SSE.replace(b"\r\n\r\n", b"\r\ntrailer: x-usage-note\r\n\r\n"), *pieces,
                            b"0;last\r\nx-usage-note: done\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200 and response.body == b"".join(events)
    assert b"ext=" not in response.raw and b"x-usage-note" not in response.raw.split(b"\r\n\r\n", 1)[1]
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"], row["error_type"]) == (77, 33, None)
