"""Shutdown's deadline reaching a stream whose answer was already complete: the upstream sent message_stop (the
client has read the whole message) and has not yet ended its body.

relay.py: "nothing is added after message_stop: the answer was complete" -- an upstream failure after it tells the
client nothing and the row keeps no error.  Shutdown's cut is no different: an `event: error` after message_stop
makes the SDKs raise on a message they have whole, and the row (error gateway_stopped, interrupted) says the
gateway cut an answer it delivered.  A real gateway (in process, real sockets, the SQLite ledger), a
ScriptedChannel whose body stays open after message_stop."""
from __future__ import annotations

from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.scripted_channel import HANG, HEAD_SSE, MESSAGE_STOP, chunk, message_start, text_events
from tests.support.scripted_gateway import ask


async def test_shutdown_after_message_stop_adds_no_error_to_a_complete_answer(scripted):
    await scripted.start()
    scripted.channel.queue([HEAD_SSE, *(chunk(e) for e in [message_start(12), *text_events("done", 7)]),
                            chunk(MESSAGE_STOP), HANG])
    conn = await RawConnection.open(scripted.gateway.host, scripted.gateway.port)
    seen = b""
    try:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": scripted.key}, json_body=ask()))
        head = await conn.read_head()
        assert head.status == 200
        pieces = conn.iter_chunks(head)
        async for piece in pieces:
            seen += piece
            if b"event: message_stop" in seen and seen.endswith(b"\n\n"):
                break
        await scripted.gateway.shutdown(timeout=0.3)
        scripted.gateway = None
        try:
            async for piece in pieces:
                seen += piece
        except Exception:       # the connection closes without the final chunk: what came before is kept
            pass
    finally:
        conn.abort()
    [row] = [dict(r) for r in scripted.query("SELECT * FROM usage")]
    after_stop = seen.split(b"event: message_stop", 1)[1]
    assert (row["input_tokens"], row["output_tokens"]) == (12, 7)
    assert b"event: error" not in after_stop and (row["error_type"], row["interrupted"]) == (None, 0), (
        f"after message_stop the client got {after_stop!r}; the row says error_type={row['error_type']!r} "
        f"interrupted={row['interrupted']}")
