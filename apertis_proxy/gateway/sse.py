"""Splice an upstream SSE stream to the client without re-encoding it.

`SseSplicer.feed(chunk)` returns the bytes that may go to the client now: every
complete event (up to the last blank line), so event boundaries stay intact
even though network chunks split anywhere -- mid-line or inside a UTF-8
character.  The incomplete tail waits for the next chunk.  That tail is all the
buffering there is; if the upstream dies mid-event it is dropped, so the
in-band `event: error` the gateway then sends is never glued onto half an event.

Only three kinds of event are parsed: `message_start` (input and cache usage,
the model name), `message_delta` (cumulative usage: the last value wins) and
`error`.  The rest is forwarded as bytes; a substring test decides whether a
complete region needs a look at all.
"""
from __future__ import annotations

from typing import Callable, Optional

import orjson

from .usage import UsageMeter

_LF2 = b"\n\n"


def _last_boundary(buf: bytes) -> int:
    """Index just past the last event terminator, or -1."""
    end = buf.rfind(_LF2)
    end = end + 2 if end >= 0 else -1
    if b"\r" in buf:  # rare: CRLF or CR line endings are legal SSE
        crlf = buf.rfind(b"\r\n\r\n")
        if crlf >= 0 and crlf + 4 > end:
            end = crlf + 4
        cr = buf.rfind(b"\r\r")
        if cr >= 0 and cr + 2 > end:
            end = cr + 2
    return end


def _split_events(region: bytes) -> list[bytes]:
    if b"\r" in region:
        region = region.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return [e for e in region.split(_LF2) if e]


def event_data(event: bytes) -> Optional[bytes]:
    """The joined `data:` lines of one event (without the terminator)."""
    lines = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            lines.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(lines) if lines else None


def event_json(event: bytes) -> Optional[dict]:
    """The event's data as a JSON object, or None (absent or not an object)."""
    data = event_data(event)
    if not data:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def event_name(event: bytes) -> Optional[bytes]:
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip()
    return None


class SseSplicer:
    """Stateful splice of one stream.  `rename_model` rewrites message_start's
    model (the client sees the name it asked for, not the upstream alias target)."""

    __slots__ = ("_tail", "meter", "rename_model", "error", "saw_stop")

    def __init__(self, meter: UsageMeter, rename_model: Optional[tuple[str, str]] = None) -> None:
        self._tail = b""
        self.meter = meter
        self.rename_model = rename_model     # (upstream id, client name)
        self.error: Optional[dict] = None    # the in-band error upstream sent, if any
        self.saw_stop = False

    def feed(self, chunk: bytes) -> bytes:
        buf = self._tail + chunk if self._tail else chunk
        end = _last_boundary(buf)
        if end < 0:
            self._tail = buf
            return b""
        if end == len(buf):
            region, self._tail = buf, b""
        else:
            region, self._tail = buf[:end], buf[end:]
        # The hot path is just these substring tests.
        if b"message_" in region or b"event: error" in region or b"event:error" in region:
            region = self._inspect(region)
        return region

    def flush(self) -> bytes:
        """Whatever is left when upstream ended cleanly (an unterminated last event)."""
        tail, self._tail = self._tail, b""
        return tail

    def drop_tail(self) -> int:
        n = len(self._tail)
        self._tail = b""
        return n

    def _inspect(self, region: bytes) -> bytes:
        rebuilt: Optional[list[bytes]] = None
        events = _split_events(region)
        for i, ev in enumerate(events):
            name = event_name(ev)
            if name == b"message_start":
                obj = event_json(ev)
                if obj is None:
                    continue
                message = obj.get("message") or {}
                self.meter.message_start(message)
                if self.rename_model and message.get("model") == self.rename_model[0]:
                    message["model"] = self.rename_model[1]
                    if rebuilt is None:
                        rebuilt = list(events)
                    rebuilt[i] = b"event: message_start\ndata: " + orjson.dumps(obj)
            elif name == b"message_delta":
                obj = event_json(ev)
                if obj is not None:
                    self.meter.message_delta(obj)
            elif name == b"message_stop":
                self.saw_stop = True
            elif name == b"error":
                obj = event_json(ev) or {}
                self.error = obj.get("error") or {"type": "api_error"}
        if rebuilt is None:
            return region
        return b"\n\n".join(rebuilt) + b"\n\n"


SpliceFactory = Callable[..., SseSplicer]
