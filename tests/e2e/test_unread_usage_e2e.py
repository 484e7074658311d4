"""2xx answers whose usage is hard to read, and usage without a price.

The gateway asks upstream for `identity`; a JSON answer in gzip anyway is decoded, metered and sent readable; a
stream in a coding goes to the client whole with its coding named, metered as unknown (cost NULL).  A stream whose
media type is written in another case, or not at all, is spliced and metered.  A 2xx whose body is not the
message is metered as unknown, never as free; a server tool count the catalogue has no price for makes the row
unpriced.  A real gateway (in process, real sockets, the real SQLite ledger) in front of a ScriptedChannel writing
exact bytes."""
from __future__ import annotations

import gzip
import json

import pytest

from tests.support.rawhttp import parse_sse
from tests.support.scripted_channel import MESSAGE_STOP, chunk, event, message_start, text_events
from tests.support.scripted_gateway import ask, post

MODEL = "claude-haiku-4-5-20251001"
# Haiku 4.5 list prices, USD per million tokens: input 1, output 5.
HAIKU_IN, HAIKU_OUT = 1, 5

MESSAGE = {"id": "msg_unread", "type": "message", "role": "assistant", "model": MODEL,
           "content": [{"type": "text", "text": "compressed"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 1200, "output_tokens": 300, "cache_creation_input_tokens": 0,
                     "cache_read_input_tokens": 0}}


def _json_head(body: bytes, *extra: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_scripted\r\n"
            + b"".join(extra) + b"content-length: %d\r\n\r\n" % len(body))


def _stream_events(input_tokens: int = 1200, output_tokens: int = 300) -> list[bytes]:
    return [message_start(input_tokens), *text_events("streamed", output_tokens), MESSAGE_STOP]


def _sse_head(content_type: bytes, *extra: bytes) -> bytes:
    """A chunked 200 head; no content-type line for an empty `content_type`."""
    ctype = b"content-type: " + content_type + b"\r\n" if content_type else b""
    return (b"HTTP/1.1 200 OK\r\n" + ctype + b"request-id: req_scripted\r\n"
            + b"".join(extra) + b"transfer-encoding: chunked\r\n\r\n")


def _client_body(response) -> bytes:
    """The body as the client's HTTP stack decodes it (content-encoding honoured when the gateway declares it)."""
    body = response.body
    if (response.header("content-encoding") or "").lower() == "gzip":
        body = gzip.decompress(body)
    return body


def _billed(row: dict, input_tokens: int, output_tokens: int) -> None:
    assert (row["input_tokens"], row["output_tokens"]) == (input_tokens, output_tokens), (
        f"metered input={row['input_tokens']} output={row['output_tokens']} cost={row['cost']} "
        f"error_type={row['error_type']}")
    assert row["cost"] == pytest.approx((input_tokens * HAIKU_IN + output_tokens * HAIKU_OUT) / 1e6, abs=1e-12)


async def test_a_gzip_json_answer_is_metered_and_readable(scripted):
    """The gateway asks for identity; an upstream that compresses all the same: decoded, metered exactly, and
    sent to the client as plain JSON."""
    await scripted.start()
    packed = gzip.compress(json.dumps(MESSAGE).encode())
    scripted.channel.queue([_json_head(packed, b"content-encoding: gzip\r\n") + packed])
    response = await post(scripted, ask(stream=False))
    assert response.status == 200
    [row] = await scripted.usage_rows(1)
    # What the upstream billed is what the ledger holds.
    _billed(row, 1200, 300)
    # And the client can read the answer it paid for.
    assert json.loads(_client_body(response))["usage"]["output_tokens"] == 300


async def test_a_gzip_event_stream_reaches_the_client_readable_and_is_metered_as_unknown(scripted):
    """A stream in gzip cannot be spliced: it goes to the client whole, with its content-encoding named, and its
    usage, unread, is unknown (cost NULL: the key's quota counts the request's reserved bound)."""
    await scripted.start()
    packed = gzip.compress(b"".join(_stream_events()))
    scripted.channel.queue([_sse_head(b"text/event-stream; charset=utf-8", b"content-encoding: gzip\r\n"),
                            chunk(packed), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200
    assert response.header("content-encoding") == "gzip"
    assert [name for name, _ in parse_sse(_client_body(response))][-1] == "message_stop"
    [row] = await scripted.usage_rows(1)
    assert row["cost"] is None and row["error_type"] is None, (row["cost"], row["error_type"])


@pytest.mark.parametrize("content_type", [b"Text/Event-Stream; charset=utf-8", b"TEXT/EVENT-STREAM", b""],
                         ids=["mixed-case", "upper-case", "no-content-type"])
async def test_an_event_stream_media_type_in_other_case_is_spliced_and_metered(scripted, content_type):
    """Media types are case-insensitive (RFC 9110 8.3.1), and the SDKs read the answer to a `stream: true`
    request as SSE whatever its content-type says: such a stream is spliced as it comes and metered."""
    await scripted.start()
    events = _stream_events()
    scripted.channel.queue([_sse_head(content_type), *(chunk(e) for e in events), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200
    assert response.body == b"".join(events)
    [row] = await scripted.usage_rows(1)
    _billed(row, 1200, 300)
    assert row["error_type"] is None


async def test_a_non_json_2xx_answer_is_metered_as_unknown_not_as_free(scripted):
    """A 200 whose body is not the JSON message (a relay's HTML maintenance page with 200, a truncated body
    under a wrong content-length) went upstream and may be billed: its usage is unknown, cost NULL, which counts
    the request's reserved bound against the key's quota (pricing.py, docs/billing.md)."""
    await scripted.start()
    page = b"<html><body>upstream maintenance</body></html>"
    scripted.channel.queue([b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nrequest-id: req_scripted\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(page), page)])
    response = await post(scripted, ask(stream=False))
    [row] = await scripted.usage_rows(1)
    assert response.status in (200, 502)
    assert row["cost"] is None, f"cost={row['cost']} error_type={row['error_type']} status={row['status']}"


async def test_an_unknown_server_tool_count_makes_the_row_unpriced_not_free(scripted):
    """`usage.server_tool_use` counts billed server-tool requests: web searches are priced, web fetches free by
    rule; a count of any other server tool is recorded, and the row is unpriced (cost NULL), never priced as if
    that tool cost nothing."""
    await scripted.start()
    body = {**MESSAGE, "usage": {**MESSAGE["usage"], "server_tool_use": {
        "web_search_requests": 0, "web_fetch_requests": 0, "code_execution_requests": 7}}}
    raw = json.dumps(body).encode()
    scripted.channel.queue([_json_head(raw) + raw])
    response = await post(scripted, ask(stream=False))
    assert response.status == 200
    [row] = await scripted.usage_rows(1)
    assert json.loads(row["server_tool_use"]).get("code_execution_requests") == 7      # recorded ...
    assert row["cost"] is None, (row["cost"], row["prices"])                            # ... and not priced as 0


async def test_usage_revised_in_message_delta_is_what_is_billed(scripted):
    """message_delta revises input and cache counts (cumulative, the last value wins) and
    carries server_tool_use (searches priced, fetches recorded); the 1 h cache split from message_start applies to
    the revised cache-write total."""
    await scripted.start()
    start = event("message_start", {"type": "message_start", "message": {
        "id": "msg_rev", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 100, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 50,
                  "cache_creation": {"ephemeral_5m_input_tokens": 20, "ephemeral_1h_input_tokens": 30},
                  "output_tokens": 1}}})
    block_start, delta, block_stop, _ = text_events("x")
    final = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                    "usage": {"input_tokens": 140, "cache_read_input_tokens": 10,
                                              "cache_creation_input_tokens": 60, "output_tokens": 70,
                                              "server_tool_use": {"web_search_requests": 2,
                                                                  "web_fetch_requests": 4}}})
    events = [start, block_start, delta, block_stop, final, MESSAGE_STOP]
    scripted.channel.queue([_sse_head(b"text/event-stream"), *(chunk(e) for e in events), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert response.status == 200 and response.body == b"".join(events)
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["cache_read_input_tokens"], row["cache_creation_input_tokens"],
            row["output_tokens"], row["web_search_requests"], row["web_fetch_requests"]) == (140, 10, 60, 70, 2, 4)
    assert (row["cache_creation_5m_input_tokens"], row["cache_creation_1h_input_tokens"]) == (20, 30)
    # Haiku 4.5: input 1, output 5, cache read 0.10, write 5 m 1.25, write 1 h 2; searches $0.01 each, fetches free.
    expected = (140 * 1 + 70 * 5 + 10 * 0.10 + 30 * 1.25 + 30 * 2) / 1e6 + 2 * 0.01
    assert row["cost"] == pytest.approx(expected, abs=1e-12)
