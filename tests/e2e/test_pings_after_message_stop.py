"""An upstream that goes on sending pings after message_stop instead of ending its body.  relay.py: "After
message_stop the upstream's body should end at once; a channel that goes quiet instead is not waited for" (the
bound is _END_AFTER_STOP).  A channel that keeps the body open with pings is not waited for either, or a client
(the SDKs read a stream to its body's end) hangs on a complete message as long as the upstream likes.  The bound
is lowered here so the test stays short; the upstream pings for 15 times that bound.  A real gateway (in process,
real sockets, the SQLite ledger), a ScriptedChannel that writes exact bytes."""
from __future__ import annotations

from apertis_proxy.gateway import relay

from tests.support.scripted_channel import HEAD_SSE, chunk, event, message_start
from tests.support.scripted_gateway import ask, post

PING = event("ping", {"type": "ping"})
DELTA = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 33}})
STOP = event("message_stop", {"type": "message_stop"})


async def test_pings_after_message_stop_do_not_hold_the_stream_open(scripted, monkeypatch):
    monkeypatch.setattr(relay, "_END_AFTER_STOP", 0.2)
    await scripted.start()
    trickle = [step for _ in range(30) for step in (chunk(PING), 0.1)]        # 3 s of pings after the stop
    scripted.channel.queue([HEAD_SSE, chunk(message_start(12)), chunk(DELTA), chunk(STOP), *trickle, b"0\r\n\r\n"])
    response = await post(scripted, ask())
    names = [name for name, _ in response.sse_events()]
    after_stop = names[names.index("message_stop") + 1:]
    assert len(after_stop) < 30, f"{len(after_stop)} events after message_stop: the stream was held open to its end"
    [row] = await scripted.usage_rows(1)
    assert (row["input_tokens"], row["output_tokens"]) == (12, 33)
