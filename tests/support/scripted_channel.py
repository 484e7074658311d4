"""A channel that misbehaves on cue, byte for byte: each request (on any connection) is answered by the next
queued script. Where tests/mock_upstream.py is a faithful upstream with a few knobs, this one writes exactly what a
test says, including what no real upstream should send.

    async with ScriptedChannel() as channel:
        channel.queue([HEAD_SSE, chunk(event(...)), CLOSE])
        env.add_channel("main", channel.base_url)

A script is a list of steps: bytes are written as they are (each its own write, a short pause after each so they
arrive as separate reads); a float sleeps that long; CLOSE closes the connection; HANG waits until the gateway goes
away. A script that ends without CLOSE keeps the connection for the next request; bytes written after the
response (a late write) land on what the gateway holds as an idle keep-alive connection. `wait_finished(n)` waits
until n scripts have run to their end.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Union

from tests.support.local_server import LocalServer

CLOSE = "close"
HANG = "hang"
Step = Union[bytes, float, str]

HEAD_SSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"request-id: req_scripted\r\ntransfer-encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())


def json_response(status: int, body: dict[str, Any], reason: bytes = b"OK") -> bytes:
    raw = json.dumps(body).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nrequest-id: req_scripted\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, reason, len(raw), raw))


def message_start(input_tokens: int = 12, model: str = "claude-haiku-4-5-20251001") -> bytes:
    return event("message_start", {"type": "message_start", "message": {
        "id": "msg_scripted", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1}}})


def text_events(text: str, output_tokens: int = 5) -> list[bytes]:
    """content_block_start .. message_delta for one text block (no message_start, no message_stop)."""
    return [
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": text}}),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                   "stop_sequence": None},
                                "usage": {"output_tokens": output_tokens}}),
    ]


MESSAGE_STOP = event("message_stop", {"type": "message_stop"})


def full_stream(text: str = "scripted", input_tokens: int = 12, output_tokens: int = 5) -> list[Step]:
    """A complete, well-formed stream: one chunk per event, then the last chunk."""
    events = [message_start(input_tokens), *text_events(text, output_tokens), MESSAGE_STOP]
    return [HEAD_SSE, *(chunk(e) for e in events), b"0\r\n\r\n"]


class ScriptedChannel(LocalServer):
    def __init__(self) -> None:
        self.scripts: list[list[Step]] = []
        self.requests: list[bytes] = []          # each request's head and body, as received
        self._writers: set[asyncio.StreamWriter] = set()
        self.finished = 0                        # scripts run to their end (or to CLOSE / HANG)
        self.connections = 0                     # connections the gateway opened
        self.hung_up = 0                         # connections the gateway closed
        self._progress = asyncio.Event()

    def queue(self, *scripts: list[Step]) -> None:
        self.scripts.extend(scripts)

    async def wait_finished(self, n: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.finished < n:
                self._progress.clear()
                await self._progress.wait()

    def _script_done(self) -> None:
        self.finished += 1
        self._progress.set()

    def _closing(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                script = self.scripts.pop(0) if self.scripts else [json_response(500, {
                    "type": "error", "error": {"type": "api_error", "message": "no script queued"}})]
                for step in script:
                    if step == CLOSE:
                        self._script_done()
                        return
                    if step == HANG:
                        self._script_done()
                        await reader.read()
                        self.hung_up += 1
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                        continue
                    writer.write(step)
                    await writer.drain()
                    await asyncio.sleep(0.005)
                self._script_done()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.hung_up += 1
        finally:
            self._writers.discard(writer)
            writer.close()
