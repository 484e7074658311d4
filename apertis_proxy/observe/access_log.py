"""One access-log line per request, in the process's log format (see logs.py).

JSON (`[logging] format = "json"`): one object per line with `time`, `level`,
`logger` ("apertis_proxy.access") and `message` like every other line, and
the request's fields: request_id, key (the key's name), client, method, path,
model (as the client asked), upstream_model, channel, attempts, status,
error_type, stream, ttfb_ms, duration_ms, input_tokens, output_tokens,
cache_read_input_tokens, cache_creation_input_tokens, cost_usd.  Text: the
same fields as `name=value` after the usual `time LEVEL logger:` prefix.
Nothing secret is among them: no key, no header, no body.

Lines are gathered and written to stderr every 0.1 s, in writes of whole lines
of at most PIPE_BUF bytes each, so the lines of several workers sharing one
pipe never interleave; a write per request was most of the log's cost.
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, Optional

import orjson

from ..errors import error_type_for
from .logs import UtcClock

LOGGER = "apertis_proxy.access"
FLUSH_INTERVAL = 0.1
FLUSH_LINES = 256
PIPE_BUF = 4096


def _local_time(t: float) -> str:
    """The text log's timestamp (logging's default asctime)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int((t % 1) * 1000):03d}"


def fields(req: Any, resp: Any, record: Any, status: int, seconds: float) -> dict:
    """The access-log fields of one request (`record` is its UsageRecord, or None when it had none)."""
    if record is None:
        return {"request_id": resp.request_id, "key": None, "client": req.client, "method": req.method,
                "path": req.path, "model": None, "upstream_model": None, "channel": None, "attempts": 0,
                "status": status, "error_type": error_type_for(status) if status >= 400 else None,
                "stream": False, "ttfb_ms": None, "duration_ms": round(seconds * 1000, 3),
                "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0, "cost_usd": 0.0}
    return {"request_id": resp.request_id, "key": record.key_name, "client": req.client, "method": req.method,
            "path": req.path, "model": record.requested_model, "upstream_model": record.upstream_model,
            "channel": record.channel_name, "attempts": record.attempts, "status": status,
            "error_type": record.error_type or (error_type_for(status) if status >= 400 else None),
            "stream": record.stream, "ttfb_ms": record.ttfb_ms, "duration_ms": round(seconds * 1000, 3),
            "input_tokens": record.input_tokens, "output_tokens": record.output_tokens,
            "cache_read_input_tokens": record.cache_read_input_tokens,
            "cache_creation_input_tokens": record.cache_creation_input_tokens, "cost_usd": record.cost}


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    text = str(value)
    if not text or any(c.isspace() or c in '"=\\' for c in text):
        return orjson.dumps(text).decode()     # quoted: a client's model name cannot forge a line
    return text


class AccessLog:
    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"
        self._clock = UtcClock()
        self._lines: list[bytes] = []
        self._timer: Optional[asyncio.TimerHandle] = None

    def __call__(self, req: Any, resp: Any, cycle: Any, status: int, seconds: float) -> None:
        entry = fields(req, resp, cycle.record, status, seconds)
        now = time.time()
        message = f"{req.method} {req.path} {status}"
        if self.json:
            line = orjson.dumps({"time": self._clock(now), "level": "INFO", "logger": LOGGER, "message": message,
                                 **entry}) + b"\n"
        else:
            pairs = " ".join(f"{name}={_text_value(value)}" for name, value in entry.items())
            line = f"{_local_time(now)} INFO {LOGGER}: {_text_value(message)} {pairs}\n".encode()
        self._lines.append(line)
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines = self._lines, []
        if not lines:
            return
        stream = sys.stderr
        out = getattr(stream, "buffer", None)
        try:
            for chunk in _chunks(lines):
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
