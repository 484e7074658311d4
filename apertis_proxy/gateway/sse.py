"""Splice an upstream SSE stream to the client without re-encoding it.

`SseSplicer.feed(chunk)` returns the bytes that may go to the client now: every
complete event (up to the last blank line), so event boundaries stay intact
even though network chunks split anywhere -- mid-line or inside a UTF-8
character.  The incomplete tail waits for the next chunk.  That tail is all the
buffering there is; if the upstream dies mid-event it is dropped, so the
in-band `event: error` the gateway then sends is never glued onto half an event.

Only a few kinds of event are parsed: `message_start` (input and cache usage,
the model name), `message_delta` (cumulative usage: the last value wins),
`message_stop` and `error`.  The rest is forwarded as bytes: substring tests
decide whether a complete region needs a look at all, and a look visits only
the events those names start, never every event of a large read.
"""
from __future__ import annotations

from typing import Callable, Optional

import orjson

from .usage import UsageMeter, redact_bytes, redactable

_LF2 = b"\n\n"


# An event is held until its end arrives (so nothing is ever glued onto half
# of one); one that has not ended by this size is not an SSE event worth
# waiting for.  Generous: a server tool's result (a fetched PDF) can be large.
MAX_EVENT_BYTES = 64 * 1024 * 1024


class EventTooLarge(ValueError):
    """The upstream sent more than MAX_EVENT_BYTES without ending an event."""


def _last_boundary(buf: bytes, start: int = 0) -> int:
    """Index just past the last event terminator at or after `start`, or -1."""
    end = buf.rfind(_LF2, start)
    end = end + 2 if end >= 0 else -1
    if buf.find(b"\r", start) >= 0:  # rare: CRLF or CR line endings are legal SSE (find: see checked())
        crlf = buf.rfind(b"\r\n\r\n", start)
        if crlf >= 0 and crlf + 4 > end:
            end = crlf + 4
        cr = buf.rfind(b"\r\r", start)
        if cr >= 0 and cr + 2 > end:
            end = cr + 2
    return end


# The event names the splicer reads: message_start, message_delta, message_stop, error.
_MARKERS = (b"message_", b"error")


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


def _watched_events(text: bytes) -> list[tuple[int, int, bytes]]:
    """(start, stop, name) of each event whose `event:` line names a
    message_* event or an error, in stream order.  Two bytes.find scans; a
    hit inside other text (a delta that says "error") costs one slice compare."""
    found = []
    for marker in _MARKERS:
        pos = text.find(marker)
        while pos >= 0:
            # `event: NAME` or `event:NAME` at a line start (SSE allows both)
            head = pos - 7 if text[pos - 1:pos] == b" " else pos - 6
            if head >= 0 and text[head:head + 6] == b"event:" and (head == 0 or text[head - 1] == 10):
                eol = text.find(b"\n", pos)
                if eol < 0:
                    eol = len(text)
                start = text.rfind(_LF2, 0, head)
                stop = text.find(_LF2, pos)
                found.append((start + 2 if start >= 0 else 0, stop if stop >= 0 else len(text),
                              text[pos:eol].rstrip()))
            pos = text.find(marker, pos + 1)
    if len(found) > 1:
        found.sort()
    return found


def _signatures(text: bytes, note: Callable[[str], None]) -> None:
    """Hand `note` the signature of each thinking block completed in `text` (whole events)."""
    for marker in (b'"signature_delta"', b'"redacted_thinking"'):
        pos = text.find(marker)
        while pos >= 0:
            start = text.rfind(_LF2, 0, pos)
            stop = text.find(_LF2, pos)
            obj = event_json(text[start + 2 if start >= 0 else 0:stop if stop >= 0 else len(text)]) or {}
            part = obj.get("delta") if marker == b'"signature_delta"' else obj.get("content_block")
            field = "signature" if marker == b'"signature_delta"' else "data"
            signed = part.get(field) if isinstance(part, dict) else None
            if isinstance(signed, str) and signed:
                note(signed)
            pos = text.find(marker, pos + 1)


class SseSplicer:
    """Stateful splice of one stream.  `rename_model` rewrites message_start's
    model (the client sees the name it asked for, not the upstream alias target)."""

    __slots__ = ("_tail", "_held", "meter", "rename_model", "_secret", "error", "saw_stop", "_signatures",
                 "unreported")

    def __init__(self, meter: UsageMeter, rename_model: Optional[tuple[str, str]] = None,
                 secret: Optional[str] = None) -> None:
        self._tail: list[bytes] = []    # the pieces of an event not yet ended
        self._held = 0                  # their length
        self.meter = meter
        self.rename_model = rename_model     # (upstream id, client name)
        # The channel's key: an in-band error quoting it is forwarded without it.
        self._secret = secret if redactable(secret) else None
        self.error: Optional[dict] = None    # the in-band error upstream sent, if any
        self.saw_stop = False
        # A message_delta read with its stream's message_stop and not yet checkpointed: the relay asks for
        # the checkpoint if the body does not end in the same read (see StreamRelay.piece).
        self.unreported = False
        # A meter that records thinking signatures (ownership.StateCapture, for a
        # request that asked for thinking) gets them; other streams never pay for the scan.
        self._signatures = getattr(meter, "signature_hook", None)

    def feed(self, chunk: bytes) -> bytes:
        """The complete events so far, to forward; raises EventTooLarge."""
        if not self._tail and chunk[-2:] == _LF2 and chunk.find(b"\r") < 0:
            # The common read: whole events, LF line endings; all of it goes out.
            region = text = chunk
        else:
            tail = self._tail
            if tail:
                # The held bytes have no terminator: look only where a new one can
                # be (the new bytes, and a terminator begun in the last 3 held),
                # and join only once there is one, so a long event costs linear time.
                last = tail[-1]
                probe = (last if len(last) >= 3 else b"".join(tail[-3:]))[-3:] + chunk
                found = _last_boundary(probe)
                if found < 0:
                    tail.append(chunk)
                    self._held += len(chunk)
                    if self._held > MAX_EVENT_BYTES:
                        raise EventTooLarge(f"upstream sent an SSE event longer than {MAX_EVENT_BYTES} bytes")
                    return b""
                buf = b"".join(tail) + chunk
                end = len(buf) - len(probe) + found
            else:
                buf = chunk
                end = _last_boundary(buf)
                if end < 0:
                    self._tail, self._held = [buf], len(buf)
                    return b""
            if end == len(buf):
                region = buf
                self._tail, self._held = [], 0
            else:
                region, rest = buf[:end], buf[end:]
                self._tail, self._held = [rest], len(rest)
            # Parse on LF-only text; CR line endings are legal SSE but rare.
            text = (region.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if region.find(b"\r") >= 0
                    else region)
        if self._signatures is not None and (text.find(b"signature_delta") >= 0
                                             or text.find(b"redacted_thinking") >= 0):
            _signatures(text, self._signatures)
        # The hot path: two substring scans find nothing worth parsing.
        watched = _watched_events(text)
        if watched:
            return self._inspect(region, text, watched)
        return region

    def passes_through(self, data: bytes) -> bool:
        """True when `data`, whole events, would leave feed() as they are with
        nothing to note: nothing is held and no event the splicer reads is in
        them (the caller checks that `data` ends an event).  `data` may carry a
        chunk's framing around the events: no marker fits in it."""
        # partition() is the cheapest substring test (one argument, no parsing
        # of start and end as find() has; `in` first tries the needle as an int).
        if self._tail or data.partition(b"message_")[1] or data.partition(b"error")[1]:
            return False
        return self._signatures is None or not (data.partition(b"signature_delta")[1]
                                                or data.partition(b"redacted_thinking")[1])

    def flush(self) -> bytes:
        """The unterminated last event when the upstream ended cleanly, ended
        (an event at the very end can lack only its blank line) and read like
        any other, so nothing the gateway adds is glued onto it.  One whose data
        is not whole JSON was cut: dropped, as a failed body's tail is."""
        tail = b"".join(self._tail)
        self._tail, self._held = [], 0
        if not tail.strip(b"\r\n"):
            return b""
        data = event_data(tail.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
        if data:
            try:
                orjson.loads(data)
            except orjson.JSONDecodeError:
                return b""
        for eol in (b"\r\n", b"\n", b"\r"):        # its last line ended: one empty line more
            if tail.endswith(eol):
                return self.feed(tail + eol)
        return self.feed(tail + b"\n\n")

    @property
    def error_type(self) -> str:
        """The type of the in-band error upstream sent (check `error` first)."""
        error = self.error
        return str(error.get("type") or "api_error") if isinstance(error, dict) else "api_error"

    def drop_tail(self) -> int:
        n = self._held
        self._tail, self._held = [], 0
        return n

    def _inspect(self, region: bytes, text: bytes, watched: list[tuple[int, int, bytes]]) -> bytes:
        renamed: list[tuple[int, int, bytes]] = []
        delta = False
        for start, stop, name in watched:
            if name == b"message_start":
                ev = text[start:stop]
                obj = event_json(ev)
                if obj is None:
                    continue
                message = obj.get("message")
                if not isinstance(message, dict):
                    message = {}            # not the message: no usage, no model to rename
                self.meter.message_start(message)
                if self.rename_model and message.get("model") == self.rename_model[0]:
                    message["model"] = self.rename_model[1]
                    renamed.append((start, stop, b"event: message_start\ndata: " + orjson.dumps(obj)))
            elif name == b"message_delta":
                obj = event_json(text[start:stop])
                if obj is not None:
                    self.meter.message_delta(obj)
                    delta = True
            elif name == b"message_stop":
                self.saw_stop = True
            elif name == b"error":
                ev = text[start:stop]
                obj = event_json(ev) or {}
                error = obj.get("error")
                # The API's shape is an object; a relay's bare string is kept as its message.
                self.error = error if isinstance(error, dict) else {
                    "type": "api_error", **({"message": str(error)[:200]} if error else {})}
                clean = redact_bytes(ev, self._secret)
                if clean is not ev:
                    renamed.append((start, stop, clean))
                    self.error = orjson.loads(redact_bytes(orjson.dumps(self.error), self._secret))
        if delta:
            if self.saw_stop:
                self.unreported = True      # its final row comes next, if the body ends now
            else:
                self.meter.reported()
        if not renamed:
            return region
        parts, last = [], 0
        for start, stop, new in renamed:
            parts += (text[last:start], new)
            last = stop
        parts.append(text[last:])
        return b"".join(parts)

