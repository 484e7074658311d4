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
from typing import Optional

import orjson

from ..errors import error_type_for
from ..plugin_api import UsageRecord
from .logs import THOUSANDTHS, Clock

LOGGER = "apertis_proxy.access"
_LOGGER = LOGGER.encode()
FLUSH_INTERVAL = 0.1
FLUSH_LINES = 256
PIPE_BUF = 4096


# A request without a usage record (refused before auth, /health, ...) is logged with these defaults.
_NO_USAGE = UsageRecord(request_id="", started_at=0.0, endpoint="")
# A value written bare in the text format; others are quoted, so a client's model name cannot forge a line.
_PLAIN = re.compile(r'[^\s"=\\]+').fullmatch
# Text lines of one kind of request (see _template) remembered, and the longest template remembered.
MAX_TEMPLATES = 4096
MAX_TEMPLATE_CHARS = 2048


def _text(value: Optional[str]) -> str:
    """A value as the text format writes it: bare, quoted, or `-` for none."""
    if value is None:
        return "-"
    return value if _PLAIN(value) else orjson.dumps(value).decode()


def _text_template(method: Optional[str], path: Optional[str], status: int, r: UsageRecord,
                   error_type: Optional[str]) -> tuple[str, ...]:
    """The text line of one kind of request, as the pieces around what differs from request to
    request (time, request id, client, ttfb, duration, the four token counts, cost): joined with
    those, without formatting the whole line each time."""
    return ("", " INFO " + LOGGER + ": " + _text(f"{method or '-'} {path or '-'} {status}") + " request_id=",
            " key_name=" + _text(r.key_name) + " client=",
            " method=" + _text(method) + " path=" + _text(path) + " requested_model=" + _text(r.requested_model) +
            " upstream_model=" + _text(r.upstream_model) + " channel_name=" + _text(r.channel_name) +
            f" attempts={r.attempts:d} status={status:d} error_type=" + _text(error_type) +
            (" stream=true" if r.stream else " stream=false") + " ttfb_ms=",
            " duration_ms=", " input_tokens=", " output_tokens=", " cache_read_input_tokens=",
            " cache_creation_input_tokens=", " cost=", "\n")


def _json_template(method: Optional[str], path: Optional[str], status: int, r: UsageRecord,
                   error_type: Optional[str]) -> tuple[str, ...]:
    """The same pieces for a JSON line: one object, the fields in the text line's order."""
    def value(v: object) -> str:
        return orjson.dumps(v).decode()
    return ('{"time":"', '","level":"INFO","logger":"' + LOGGER + '","message":' +
            value(f"{method or '-'} {path or '-'} {status}") + ',"request_id":',
            ',"key_name":' + value(r.key_name) + ',"client":',
            ',"method":' + value(method) + ',"path":' + value(path) + ',"requested_model":' +
            value(r.requested_model) + ',"upstream_model":' + value(r.upstream_model) + ',"channel_name":' +
            value(r.channel_name) + f',"attempts":{r.attempts:d},"status":{status:d},"error_type":' +
            value(error_type) + ',"stream":' + value(bool(r.stream)) + ',"ttfb_ms":',
            ',"duration_ms":', ',"input_tokens":', ',"output_tokens":', ',"cache_read_input_tokens":',
            ',"cache_creation_input_tokens":', ',"cost":', "}\n")


# Numbers as text (the same in JSON), from tables: token counts and whole milliseconds are mostly
# small (a fraction of a millisecond is logs.THOUSANDTHS).
_SMALL = [str(n) for n in range(4096)]
_costs: dict[Optional[float], str] = {}


def _cost_text(cost: Optional[float]) -> str:
    """A cost as both formats write it: a number (repr: the shortest that reads back the same),
    or null for a model without a price."""
    text = _costs.get(cost)         # type: ignore[arg-type]
    if text is None:
        if len(_costs) >= MAX_TEMPLATES:
            _costs.clear()
        text = _costs[cost] = "null" if cost is None else repr(cost)   # type: ignore[index]
    return text


def _millis_text(micros: int) -> str:
    """Microseconds as milliseconds with three decimals (integer arithmetic, no float formatting)."""
    millis = micros // 1000
    return (_SMALL[millis] if 0 <= millis < 4096 else str(millis)) + "." + THOUSANDTHS[micros % 1000]


class AccessLog:
    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"
        # The request path only notes the facts (one tuple: perf_counter time, seconds,
        # status, method, path, client, request id, usage record or None); lines are
        # formatted and written together, every FLUSH_INTERVAL seconds.
        self._pending: list[tuple] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._templates: dict[tuple, tuple[str, ...]] = {}
        self._stamp = Clock(utc=self.json).at_millis

    def __call__(self, entry: tuple) -> None:
        pending = self._pending
        pending.append(entry)
        if len(pending) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def refused(self, status: int, error_type: str, request_id: str, method: Optional[str], path: Optional[str],
                client: str) -> None:
        """A request the HTTP layer refused before the gateway saw it."""
        record = UsageRecord(request_id=request_id, started_at=0.0, endpoint="", error_type=error_type)
        self((time.perf_counter(), 0.0, status, method, path, client, request_id, record))

    def lines(self, entries: list[tuple]) -> bytes:
        """The log lines of noted requests, as one block of bytes: the pieces of every line
        gathered into one list, joined and encoded once."""
        dumps, as_json, small = orjson.dumps, self.json, _SMALL
        template, templates = (_json_template if as_json else _text_template), self._templates
        no_ttfb = "null" if as_json else "-"
        stamp, last_millis = self._stamp, -1
        to_wall = time.time() - time.perf_counter()
        out: list[str] = []
        extend = out.extend
        for when, seconds, status, method, path, client, request_id, r in entries:
            r = r or _NO_USAGE
            # What the line of this kind of request says besides the figures: its template's key.
            kind = (method, path, status, r.key_name, r.requested_model, r.upstream_model, r.channel_name,
                    r.attempts, r.error_type, r.stream)
            pieces = templates.get(kind)
            if pieces is None:
                error_type = r.error_type or (error_type_for(status) if status >= 400 else None)
                pieces = template(method, path, status, r, error_type)
                if len(pieces[3]) <= MAX_TEMPLATE_CHARS:
                    if len(templates) >= MAX_TEMPLATES:
                        templates.clear()
                    templates[kind] = pieces
            millis = int((when + to_wall) * 1000)
            if millis != last_millis:
                last_millis = millis
                time_text = stamp(millis)
            if as_json:
                request_id, client = dumps(request_id).decode(), dumps(client).decode()
            ttfb = r.ttfb_ms
            n_in, n_out, n_read, n_write = (r.input_tokens, r.output_tokens, r.cache_read_input_tokens,
                                            r.cache_creation_input_tokens)
            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10 = pieces
            extend((
                p0, time_text, p1, request_id, p2, client, p3,
                no_ttfb if ttfb is None else _millis_text(round(ttfb * 1000)),
                p4, _millis_text(int(seconds * 1_000_000)),
                p5, small[n_in] if 0 <= n_in < 4096 else str(n_in),
                p6, small[n_out] if 0 <= n_out < 4096 else str(n_out),
                p7, small[n_read] if 0 <= n_read < 4096 else str(n_read),
                p8, small[n_write] if 0 <= n_write < 4096 else str(n_write),
                p9, _costs.get(r.cost) or _cost_text(r.cost), p10))
        return "".join(out).encode()

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


def _chunks(data: bytes) -> list[bytes]:
    """Whole lines of `data` in pieces of at most PIPE_BUF bytes (a longer line alone)."""
    chunks: list[bytes] = []
    start, size = 0, len(data)
    while size - start > PIPE_BUF:
        cut = data.rfind(b"\n", start, start + PIPE_BUF) + 1     # after the last line that fits
        if cut <= start:                                          # a line longer than PIPE_BUF
            cut = data.index(b"\n", start + PIPE_BUF) + 1
        chunks.append(data[start:cut])
        start = cut
    if start < size:
        chunks.append(data[start:])
    return chunks
