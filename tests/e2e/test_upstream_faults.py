"""Channels that misbehave in ways a faithful mock does not: what the client gets, what the ledger records and
what the router learns. The gateway is real (in process, real sockets); the channel is a ScriptedChannel writing
exactly the bytes each test gives it; clients are the raw HTTP client and the official SDK."""
from __future__ import annotations

import asyncio
import json
import logging

import anthropic
import pytest

from apertis_proxy.gateway import relay
from tests.support.gateway_env import NO_COOLDOWNS
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import (CLOSE, HANG, HEAD_SSE, MESSAGE_STOP, ScriptedChannel, chunk, event,
                                            full_stream, json_response, message_start, text_events)
from tests.support.scripted_gateway import CHANNEL_KEY, ask, post

MODEL = "claude-haiku-4-5-20251001"


def names(response) -> list[str]:
    return [name for name, _ in response.sse_events()]


OPENING = [HEAD_SSE, chunk(message_start(input_tokens=12))] + [chunk(e) for e in text_events("done", 7)]


async def test_upstream_closing_after_message_stop_still_delivers_a_complete_stream(scripted):
    """No final chunk, the connection just closes: the message was complete at message_stop, so the client gets
    it whole (no error appended to an answer it already has) and nothing is recorded as an error."""
    await scripted.start()
    scripted.channel.queue(OPENING + [chunk(MESSAGE_STOP), CLOSE])
    response = await post(scripted, ask())
    assert response.status == 200
    assert names(response)[-1] == "message_stop" and "error" not in names(response)
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["error_type"], row["interrupted"]) == (200, None, 0)
    assert (row["input_tokens"], row["output_tokens"]) == (12, 7)


async def test_upstream_silent_after_message_stop_is_not_waited_for(scripted, monkeypatch):
    """After message_stop the body's end should follow at once; a channel that goes quiet instead is given
    _END_AFTER_STOP, not the read timeout (minutes), and the SDK gets its complete message."""
    monkeypatch.setattr(relay, "_END_AFTER_STOP", 0.3)
    await scripted.start(read_timeout=60.0)
    scripted.channel.queue(OPENING + [chunk(MESSAGE_STOP), HANG])
    async with anthropic.AsyncAnthropic(base_url=scripted.base_url, api_key=scripted.key, max_retries=0,
                                        timeout=20.0) as client:
        async with client.messages.stream(model=MODEL, max_tokens=64,
                                          messages=[{"role": "user", "content": "hi"}]) as stream:
            final = await asyncio.wait_for(stream.get_final_message(), 20)
    assert final.content[0].text == "done" and final.usage.output_tokens == 7
    [row] = await scripted.usage_rows(1)
    assert (row["error_type"], row["interrupted"], row["output_tokens"]) == (None, 0, 7)


@pytest.mark.parametrize("ending", [b"", b"\n"])
async def test_last_event_missing_its_blank_line_is_ended_not_glued_to_an_error(scripted, ending):
    """The body ends cleanly right after message_stop's data line: the gateway ends that event itself; the
    client sees a well-formed message_stop and no error."""
    await scripted.start()
    stop = b'event: message_stop\ndata: {"type": "message_stop"}' + ending
    scripted.channel.queue(OPENING + [chunk(stop), b"0\r\n\r\n"])
    response = await post(scripted, ask())
    assert names(response)[-1] == "message_stop" and "error" not in names(response), response.body[-200:]
    [row] = await scripted.usage_rows(1)
    assert row["error_type"] is None


async def test_upstream_error_event_then_close_is_told_once_and_kept_as_its_type(scripted):
    await scripted.start()
    err = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    scripted.channel.queue([HEAD_SSE, chunk(message_start()), chunk(err), CLOSE])
    response = await post(scripted, ask())
    assert names(response) == ["message_start", "error"]
    assert json.loads(response.sse_events()[-1][1])["error"]["type"] == "overloaded_error"
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["error_type"]) == (200, "overloaded_error")


async def test_a_stream_that_fails_mid_way_cools_its_channel_down(gateway_env):
    """A 2xx head followed by a cut stream is the channel's failure: the router cools it down and the next
    request goes to the healthy channel (reported as a success, it would clear any cooldown)."""
    async with ScriptedChannel() as flaky, ScriptedChannel() as healthy:
        gateway_env.key = gateway_env.add_key("alice")
        gateway_env.add_channel("flaky", flaky.base_url, priority=10)
        gateway_env.add_channel("healthy", healthy.base_url, priority=1)
        await gateway_env.start()
        flaky.queue(OPENING[:3] + [CLOSE])            # cut before message_stop
        healthy.queue(full_stream("from healthy"), full_stream("from healthy"))
        first = await post(gateway_env, ask())
        assert names(first)[-1] == "error"
        for _ in range(2):
            again = await post(gateway_env, ask())
            assert names(again)[-1] == "message_stop"
        assert len(flaky.requests) == 1 and len(healthy.requests) == 2
        rows = await gateway_env.usage_rows(3)
        assert [(r["channel_name"], r["error_type"]) for r in rows] == [
            ("flaky", "api_error"), ("healthy", None), ("healthy", None)]


async def test_channel_key_quoted_by_the_upstream_never_reaches_client_log_or_listing(scripted, caplog):
    """Some relays quote the credential they were sent in their error messages. The gateway's key must not
    leave it: not in the client's error (JSON or in-band), not in the log, not in the disable reason."""
    await scripted.start(**NO_COOLDOWNS)
    quoted = f"invalid x-api-key {CHANNEL_KEY} for this org"
    in_band = event("error", {"type": "error", "error": {"type": "api_error", "message": quoted}})
    scripted.channel.queue(
        [json_response(500, {"type": "error", "error": {"type": "api_error", "message": quoted}},
                       b"Internal Server Error")],
        [HEAD_SSE, chunk(message_start()), chunk(in_band), b"0\r\n\r\n"],
        [json_response(401, {"type": "error", "error": {"type": "authentication_error", "message": quoted}},
                       b"Unauthorized")])
    with caplog.at_level(logging.DEBUG):
        bodies = [(await post(scripted, ask(stream=False))).body,
                  (await post(scripted, ask())).body,
                  (await post(scripted, ask(stream=False))).body]
        await asyncio.sleep(0.2)              # the disable reason is written in the background
    assert b"[redacted]" in bodies[0] and b"[redacted]" in bodies[1]
    for body in bodies:
        assert CHANNEL_KEY.encode() not in body
    assert CHANNEL_KEY not in caplog.text and "[redacted]" in caplog.text
    [reason] = scripted.query("SELECT disabled_reason FROM channels WHERE name = 'main'")
    assert reason[0] and "[redacted]" in reason[0] and CHANNEL_KEY not in reason[0]
    [health] = scripted.query("SELECT last_error FROM channel_health")
    assert "[redacted]" in health[0] and CHANNEL_KEY not in health[0]


async def test_absurd_token_counts_do_not_stop_the_ledger(scripted):
    """An output_tokens SQLite cannot store (>= 2**63) would fail the meter's batch for good, and every later row
    with it. The count is ignored; this row and the ones after it land."""
    await scripted.start()
    events = [message_start(), *text_events("x", output_tokens=2 ** 63), MESSAGE_STOP]
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in events), b"0\r\n\r\n"], full_stream(output_tokens=9))
    for _ in range(2):
        assert (await post(scripted, ask())).status == 200
    rows = await scripted.usage_rows(2)
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [(12, 1), (12, 9)]


async def test_json_answer_whose_client_left_is_metered_as_interrupted(scripted):
    """The client left while the upstream was still answering: the answer is awaited (its usage is billed) but
    nobody took it, so the row says 499 client_closed_request, interrupted, with the tokens."""
    await scripted.start()
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
            "content": [{"type": "text", "text": "late"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 11, "output_tokens": 4}}
    scripted.channel.queue([0.5, json_response(200, body)])
    conn = await RawConnection.open(scripted.gateway.host, scripted.gateway.port)
    await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": scripted.key}, json_body=ask(False)))
    await asyncio.sleep(0.1)
    conn.abort()
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["error_type"], row["interrupted"]) == (499, "client_closed_request", 1)
    assert (row["input_tokens"], row["output_tokens"]) == (11, 4)


async def test_error_answered_as_an_sse_event_gives_its_message(scripted):
    """A relay answering a streaming request's 529 with the error as an SSE event: the client gets Anthropic's
    error with the message, not the raw event text."""
    await scripted.start()
    raw = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    scripted.channel.queue([b"HTTP/1.1 529 Overloaded\r\ncontent-type: text/event-stream\r\ncontent-length: %d"
                            b"\r\n\r\n%s" % (len(raw), raw)])
    response = await post(scripted, ask())
    assert response.status == 529
    assert response.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}


async def test_never_ending_event_fails_the_stream_in_band(scripted, monkeypatch):
    """An event that never ends is held (never forwarded in half) only up to MAX_EVENT_BYTES; past it the stream
    fails with an in-band error, and the proxy has not buffered without bound."""
    from apertis_proxy.gateway import sse
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 64 * 1024)
    await scripted.start()
    endless = b"event: content_block_delta\ndata: " + b"z" * 16 * 1024
    scripted.channel.queue([HEAD_SSE, chunk(message_start())] + [chunk(endless)] * 8 + [HANG])
    response = await post(scripted, ask())
    assert names(response) == ["message_start", "error"]
    assert b"zzzz" not in response.body
    assert "longer than" in json.loads(response.sse_events()[-1][1])["error"]["message"]
    [row] = await scripted.usage_rows(1)
    assert row["error_type"] == "api_error"


# -- the keep-alive pool: a connection carries one exchange at a time ---------------------------------------------

def answer(text: str, input_tokens: int, output_tokens: int) -> bytes:
    return json_response(200, {"id": "msg_" + text, "type": "message", "role": "assistant", "model": MODEL,
                               "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                               "stop_sequence": None,
                               "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}})


@pytest.mark.parametrize("late", [answer("stray", 900, 900), b"HTTP/1.1 200 OK\r\n"],
                         ids=["a-whole-response", "a-partial-head"])
async def test_bytes_written_on_an_idle_connection_never_answer_the_next_request(scripted, late):
    """The upstream writes on a keep-alive connection after its response was read whole: those bytes must not
    become the answer to the next request sent on it (another client's, billed for it), nor shift every later
    answer by one. A connection that received anything while idle is never reused."""
    await scripted.start()
    scripted.channel.queue([answer("first", 10, 1), late], [answer("second", 20, 2)], [answer("third", 30, 3)])
    assert (await post(scripted, ask(False))).json()["content"][0]["text"] == "first"
    await scripted.channel.wait_finished(1)          # the late bytes are out
    await asyncio.sleep(0.1)
    texts = [(await post(scripted, ask(False))).json()["content"][0]["text"] for _ in range(2)]
    assert texts == ["second", "third"]
    rows = await scripted.usage_rows(3)
    assert [(r["status"], r["input_tokens"], r["output_tokens"]) for r in rows] == [(200, 10, 1), (200, 20, 2),
                                                                                   (200, 30, 3)]


async def test_a_storm_of_interim_responses_is_refused(scripted):
    """Thousands of 1xx heads before the final one: the gateway reads a few, then gives up on that upstream
    connection with a 502 (parsing them all would stall every other request on the worker)."""
    await scripted.start()
    storm = b"HTTP/1.1 100 Continue\r\n\r\n" * 2000
    scripted.channel.queue([storm, storm, answer("after the storm", 10, 1)])
    response = await post(scripted, ask(False))
    assert response.status == 502
    assert response.json()["error"]["type"] == "api_error"
    assert "interim" in response.json()["error"]["message"]
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["error_type"]) == (502, "api_error")
    health = await RawConnection.open(scripted.gateway.host, scripted.gateway.port)
    async with health:
        assert (await health.request("GET", "/health")).status == 200


# -- a client that leaves a stream: billed for what the upstream generated ----------------------------------------

PING = event("ping", {"type": "ping"})
STAGES = ["head", "message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
          "message_delta"]


def paused_stream(after: str, pause: float = 0.4) -> list:
    """A whole stream (input 12, output 17) with a pause after the event `after` (or after the head)."""
    events = [message_start(12), PING, *text_events("generated whole", 17), MESSAGE_STOP]
    script: list = [HEAD_SSE]
    if after == "head":
        script.append(pause)
    for e in events:
        script.append(chunk(e))
        if e.startswith(b"event: " + after.encode() + b"\n"):
            script.append(pause)
    return script + [b"0\r\n\r\n"]


async def leave_after(env, after: str) -> None:
    """Stream a request, read until the event `after` (or the head) arrived, then close the connection."""
    conn = await RawConnection.open(env.gateway.host, env.gateway.port)
    try:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": env.key}, json_body=ask()))
        head = await conn.read_head()
        assert head.status == 200
        seen = b""
        if after != "head":
            async for piece in conn.iter_chunks(head):
                seen += piece
                if (b"event: " + after.encode() + b"\n") in seen:
                    break
        assert b"message_stop" not in seen
    finally:
        conn.abort()


@pytest.mark.parametrize("after", STAGES)
async def test_a_client_leaving_a_stream_is_billed_what_the_upstream_sent(scripted, after):
    """The client leaves at each stage of a stream: the gateway reads on until the upstream's usage is final and
    meters that (output 17, not the placeholder 1 of message_start), then puts the connection back in the pool."""
    await scripted.start()
    scripted.channel.queue(paused_stream(after), full_stream(output_tokens=3))
    await leave_after(scripted, after)
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["interrupted"], row["error_type"]) == (200, 1, None)
    assert (row["input_tokens"], row["output_tokens"]) == (12, 17)
    assert (await post(scripted, ask())).status == 200
    assert scripted.channel.connections == 1 and scripted.channel.hung_up == 0     # read whole, then reused


async def test_the_drain_after_a_client_left_is_bounded_in_time(scripted, monkeypatch):
    """An upstream that goes quiet after the client left is not waited for past DRAIN_SECONDS: the connection is
    closed and what was seen is metered."""
    monkeypatch.setattr(relay, "DRAIN_SECONDS", 0.3)
    await scripted.start(read_timeout=60.0)
    scripted.channel.queue([HEAD_SSE, chunk(message_start(12)), chunk(PING), HANG])
    await leave_after(scripted, "ping")
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["interrupted"], row["input_tokens"], row["output_tokens"]) == (200, 1, 12, 1)
    await asyncio.wait_for(_until(lambda: scripted.channel.hung_up == 1), 10)


async def test_the_drain_after_a_client_left_is_bounded_in_bytes(scripted, monkeypatch):
    """Past DRAIN_BYTES after the client left, the upstream connection is closed (the gateway never reads an
    endless stream for nobody); the usage seen by then is metered."""
    monkeypatch.setattr(relay, "DRAIN_BYTES", 64 * 1024)
    await scripted.start()
    filler = chunk(event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": "z" * 16384}}))
    scripted.channel.queue([HEAD_SSE, chunk(message_start(12)), chunk(PING), 0.4] + [filler] * 8
                           + [chunk(e) for e in text_events("late", 99)] + [HANG])
    await leave_after(scripted, "ping")
    [row] = await scripted.usage_rows(1)
    assert (row["status"], row["interrupted"], row["input_tokens"], row["output_tokens"]) == (200, 1, 12, 1)
    await asyncio.wait_for(_until(lambda: scripted.channel.hung_up == 1), 10)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)
