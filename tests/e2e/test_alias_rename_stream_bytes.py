"""A stream answered for a channel alias: message_start's model goes back to the name the client asked for, and
nothing else changes.  README: "streams are spliced through byte for byte"; the rename is the one documented
change.  So the events that share a read with message_start keep their bytes (CRLF line endings included), and
message_start keeps its other fields (an `id:` line).  A real gateway (in process, real sockets), a
ScriptedChannel that writes exact bytes."""
from __future__ import annotations

from tests.support.gateway_requests import HAIKU
from tests.support.gateway_requests import post as post_as
from tests.support.scripted_channel import HEAD_SSE, ScriptedChannel, chunk, event, message_start
from tests.support.scripted_gateway import ask

DELTA = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 33}})
STOP = event("message_stop", {"type": "message_stop"})
PING = event("ping", {"type": "ping"})


async def _through_alias(gateway_env, first: bytes, rest: bytes):
    async with ScriptedChannel() as channel:
        key = gateway_env.add_key("alice")
        gateway_env.add_channel("main", channel.base_url, aliases={"team-fast": HAIKU})
        await gateway_env.start()
        channel.queue([HEAD_SSE, chunk(first), chunk(rest), b"0\r\n\r\n"])
        response = await post_as(gateway_env, key, {**ask(), "model": "team-fast"})
        [row] = await gateway_env.usage_rows(1)
    assert response.status == 200 and row["input_tokens"] == 12 and row["output_tokens"] == 33
    assert b'"model":"team-fast"' in response.body
    return response.body


async def test_crlf_events_read_with_a_renamed_message_start_keep_their_bytes(gateway_env):
    first = (message_start(12) + PING).replace(b"\n", b"\r\n")
    rest = (PING + DELTA + STOP).replace(b"\n", b"\r\n")
    body = await _through_alias(gateway_env, first, rest)
    after_start = body[body.index(b"event: ping"):]
    assert after_start == PING.replace(b"\n", b"\r\n") + rest, \
        f"the ping that shared message_start's read went out as {after_start[:40]!r}"


async def test_a_renamed_message_start_keeps_its_id_line(gateway_env):
    first = b"id: 1\n" + message_start(12)
    body = await _through_alias(gateway_env, first, PING + DELTA + STOP)
    assert body.split(b"\n\n")[0].startswith(b"id: 1\n"), body.split(b"\n\n")[0][:60]
