"""One access-log line per request, in the process's log format (see logs.py).

JSON (`[logging] format = "json"`): one object per line with `time`, `level`,
`logger` ("apertis_proxy.access") and `message` like every other line, and
the request's fields, named as the ledger's columns where it has one:
request_id, key_name, client, method, path, requested_model, upstream_model,
channel_name, attempts, status, error_type, stream, ttfb_ms, duration_ms,
input_tokens, output_tokens, cache_read_input_tokens,
cache_creation_input_tokens, cost (USD).  Text: the same fields as
`name=value` after the usual `time LEVEL logger:` prefix.  Nothing secret is
among them: no key, no header, no body.

The request path only notes each request's facts; every 0.1 s the noted
requests become lines, written to stderr in writes of whole lines of at most
PIPE_BUF bytes each, so the lines of several workers sharing one pipe never
interleave.
"""
from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import Any, Optional

import orjson

from ..errors import error_type_for
from ..plugin_api import UsageRecord
from .logs import Clock

LOGGER = "apertis_proxy.access"
_LOGGER = LOGGER.encode()
FLUSH_INTERVAL = 0.1
FLUSH_LINES = 256
PIPE_BUF = 4096


# A request without a usage record (refused before auth, /health, ...) is logged with these defaults.
_NO_USAGE = UsageRecord(request_id="", started_at=0.0, endpoint="")
# A value written bare in the text format; others are quoted, so a client's model name cannot forge a line.
_PLAIN = re.compile(r'[^\s"=\\]+').fullmatch
_TEXT = ("%s INFO " + LOGGER + ": %s request_id=%s key_name=%s client=%s method=%s path=%s requested_model=%s"
         " upstream_model=%s channel_name=%s attempts=%d status=%d error_type=%s stream=%s ttfb_ms=%s duration_ms=%s"
         " input_tokens=%d output_tokens=%d cache_read_input_tokens=%d cache_creation_input_tokens=%d cost=%s\n")


# Text-format values already written once: the same few key, model and channel names recur on every line.
_written: dict[Optional[str], str] = {None: "-"}
MAX_REMEMBERED = 4096


def _text(value: Optional[str]) -> str:
    text = _written.get(value)
    if text is None:
        text = value if _PLAIN(value) else orjson.dumps(value).decode()   # type: ignore[arg-type]
        if len(_written) >= MAX_REMEMBERED:
            _written.clear()
            _written[None] = "-"
        _written[value] = text
    return text


class AccessLog:
    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"
        self._clock = Clock(utc=self.json)
        # The request path only notes the facts (one tuple); lines are formatted
        # and written together, every FLUSH_INTERVAL seconds.
        self._pending: list[tuple] = []
        self._timer: Optional[asyncio.TimerHandle] = None

    def __call__(self, req: Any, resp: Any, cycle: Any, status: int, seconds: float) -> None:
        self._note((time.time(), seconds, status, req.method, req.path, req.client, resp.request_id, cycle.record))

    def _note(self, entry: tuple) -> None:
        pending = self._pending
        pending.append(entry)
        if len(pending) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def refused(self, status: int, error_type: str, request_id: str, method: Optional[str], path: Optional[str],
                client: str) -> None:
        """A request the HTTP layer refused before the gateway saw it (rare: no need to be quick)."""
        record = UsageRecord(request_id=request_id, started_at=0.0, endpoint="", error_type=error_type)
        self._note((time.time(), 0.0, status, method, path, client, request_id, record))

    def lines(self, entries: list[tuple]) -> list[bytes]:
        """The log lines of noted requests."""
        clock, dumps, written, quoted = self._clock, orjson.dumps, _written, _text
        out = []
        for when, seconds, status, method, path, client, request_id, r in entries:
            duration_ms = int(seconds * 1_000_000) / 1000   # prints as at most 3 decimals, and cheaper than round()
            r = r or _NO_USAGE
            error_type = r.error_type or (error_type_for(status) if status >= 400 else None)
            message = f"{method or '-'} {path or '-'} {status}"
            if self.json:
                out.append(dumps({
                    "time": clock(when), "level": "INFO", "logger": LOGGER, "message": message,
                    "request_id": request_id, "key_name": r.key_name, "client": client, "method": method,
                    "path": path, "requested_model": r.requested_model, "upstream_model": r.upstream_model,
                    "channel_name": r.channel_name, "attempts": r.attempts, "status": status,
                    "error_type": error_type, "stream": r.stream, "ttfb_ms": r.ttfb_ms, "duration_ms": duration_ms,
                    "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                    "cache_read_input_tokens": r.cache_read_input_tokens,
                    "cache_creation_input_tokens": r.cache_creation_input_tokens, "cost": r.cost}) + b"\n")
                continue
            # Inline look-ups of already written values: a call per field was most of a line's cost.
            out.append((_TEXT % (
                clock(when), written.get(message) or quoted(message), request_id,
                written.get(r.key_name) or quoted(r.key_name), client, method or "-", written.get(path) or quoted(path),
                written.get(r.requested_model) or quoted(r.requested_model),
                written.get(r.upstream_model) or quoted(r.upstream_model),
                written.get(r.channel_name) or quoted(r.channel_name), r.attempts, status,
                written.get(error_type) or quoted(error_type), "true" if r.stream else "false",
                "-" if r.ttfb_ms is None else dumps(r.ttfb_ms).decode(), dumps(duration_ms).decode(),
                r.input_tokens, r.output_tokens, r.cache_read_input_tokens, r.cache_creation_input_tokens,
                dumps(r.cost).decode())).encode())
        return out

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        entries, self._pending = self._pending, []
        if not entries:
            return
        stream = sys.stderr
        out = getattr(stream, "buffer", None)
        try:
            for chunk in _chunks(self.lines(entries)):
                if out is not None:
                    out.write(chunk)
                    out.flush()         # one write(2) per chunk
                else:
                    stream.write(chunk.decode())
                    stream.flush()
        except (OSError, ValueError):
            pass        # stderr gone (closed pipe): the log cannot be written, the requests still are

    def close(self) -> None:
        self.flush()


def _chunks(lines: list[bytes]) -> list[bytes]:
    """Whole lines joined into pieces of at most PIPE_BUF bytes (a longer line alone)."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > PIPE_BUF:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(b"".join(current))
    return chunks
