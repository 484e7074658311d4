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
# A value written bare in the text format; others are quoted (JSON escapes), so a client's model name cannot
# forge a line nor reach a terminal's control sequences.
_PLAIN = re.compile(r'[^\s"=\\\x00-\x1f\x7f-\x9f]+').fullmatch
# What JSON leaves raw but a terminal acts on: DEL and the C1 controls (U+009B starts an escape sequence too).
_ESCAPE_C1 = {c: f"\\u{c:04x}" for c in range(0x7f, 0xa0)}
# Costs and clients remembered as text; the longest pieces of a kind of request the recorder remembers (a longer
# path or model name is formatted again for each request, not kept).
MAX_TEMPLATES = 4096
MAX_TEMPLATE_CHARS = 2048
# A longer path is cut (and ends in "..."): with the other fields (model names of at most 256 characters) a line
# then stays within PIPE_BUF, one write that other workers' lines cannot split.
MAX_PATH_CHARS = 512


def _json(value: object) -> str:
    """A value as JSON text, DEL and the C1 controls escaped too."""
    return orjson.dumps(value).decode().translate(_ESCAPE_C1)


def _text(value: Optional[str]) -> str:
    """A value as the text format writes it: bare, quoted, or `-` for none."""
    if value is None:
        return "-"
    return value if _PLAIN(value) else _json(value)


def _text_template(method: Optional[str], path: Optional[str], status: int, r: UsageRecord,
                   error_type: Optional[str]) -> tuple[str, ...]:
    """The text line of one kind of request, as the pieces around what differs from request to
    request: the time, request id, client, then ttfb, duration, the four token counts and cost
    (those after the last piece, the same for every kind)."""
    return ("", " INFO " + LOGGER + ": " + _text(f"{method or '-'} {path or '-'} {status}") + " request_id=",
            " key_name=" + _text(r.key_name) + " client=",
            " method=" + _text(method) + " path=" + _text(path) + " requested_model=" + _text(r.requested_model) +
            " upstream_model=" + _text(r.upstream_model) + " channel_name=" + _text(r.channel_name) +
            f" attempts={r.attempts:d} status={status:d} error_type=" + _text(error_type) +
            (" stream=true" if r.stream else " stream=false") + " ttfb_ms=")


def _json_template(method: Optional[str], path: Optional[str], status: int, r: UsageRecord,
                   error_type: Optional[str]) -> tuple[str, ...]:
    """The same pieces for a JSON line: one object, the fields in the text line's order (the
    second piece starts with the `Z` that ends the time).  The request id goes between quotes
    as it is: the gateway makes them (`req_` and hex digits, http/request_ids.py), and the
    text format writes them bare too."""
    return ('{"time":"', 'Z","level":"INFO","logger":"' + LOGGER + '","message":' +
            _json(f"{method or '-'} {path or '-'} {status}") + ',"request_id":"',
            '","key_name":' + _json(r.key_name) + ',"client":',
            ',"method":' + _json(method) + ',"path":' + _json(path) + ',"requested_model":' +
            _json(r.requested_model) + ',"upstream_model":' + _json(r.upstream_model) + ',"channel_name":' +
            _json(r.channel_name) + f',"attempts":{r.attempts:d},"status":{status:d},"error_type":' +
            _json(error_type) + ',"stream":' + _json(bool(r.stream)) + ',"ttfb_ms":')


_costs: dict[Optional[float], str] = {}
# Clients (an address and port: one a connection) as JSON strings.
_clients: dict[str, str] = {}


def _cost_text(cost: Optional[float]) -> str:
    """A cost as both formats write it: a number (repr: the shortest that reads back the same),
    or null for a model without a price."""
    text = _costs.get(cost)         # type: ignore[arg-type]
    if text is None:
        if len(_costs) >= MAX_TEMPLATES:
            _costs.clear()
        text = _costs[cost] = "null" if cost is None else repr(cost)   # type: ignore[index]
    return text


def _client_json(client: str) -> str:
    text = _clients.get(client)
    if text is None:
        if len(_clients) >= MAX_TEMPLATES:
            _clients.clear()
        text = _clients[client] = orjson.dumps(client).decode()
    return text


class AccessLog:
    """The request path notes each request as one tuple in `pending` (see Recorder.end):
    (its kind's line pieces, perf_counter time, seconds, client, request id, usage record or
    None), arms the timer with the first (`arm`) and flushes at FLUSH_LINES; every
    FLUSH_INTERVAL seconds the noted requests become lines, formatted and written together."""

    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"
        self.pending: list[tuple] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._template = _json_template if self.json else _text_template
        self._clock = Clock(utc=self.json)

    def pieces(self, method: Optional[str], path: Optional[str], status: int,
               record: Optional[UsageRecord]) -> tuple[str, ...]:
        """The pieces of the lines of one kind of request (the recorder keeps them with the kind's series)."""
        r = record or _NO_USAGE
        error_type = r.error_type or (error_type_for(status) if status >= 400 else None)
        if path is not None and len(path) > MAX_PATH_CHARS:
            path = path[:MAX_PATH_CHARS] + "..."
        return self._template(method, path, status, r, error_type)

    def entry(self, when: float, seconds: float, status: int, method: Optional[str], path: Optional[str],
              client: str, request_id: str, record: Optional[UsageRecord]) -> tuple:
        """What a request leaves in `pending`, from its facts."""
        return (self.pieces(method, path, status, record), when, seconds, client, request_id, record)

    def arm(self) -> None:
        """The first request noted since the last flush: flush FLUSH_INTERVAL seconds from now
        (unless a timer is armed already: a flush at FLUSH_LINES leaves it)."""
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + FLUSH_INTERVAL, self._due)

    def _due(self) -> None:
        self._timer = None
        self.flush()

    def __call__(self, entry: tuple) -> None:
        pending = self.pending
        pending.append(entry)
        if len(pending) >= FLUSH_LINES:
            self.flush()
        else:
            self.arm()

    def refused(self, status: int, error_type: str, request_id: str, method: Optional[str], path: Optional[str],
                client: str) -> None:
        """A request the HTTP layer refused before the gateway saw it."""
        record = UsageRecord(request_id=request_id, started_at=0.0, endpoint="", error_type=error_type)
        self(self.entry(time.perf_counter(), 0.0, status, method, path, client, request_id, record))

    def lines(self, entries: list[tuple]) -> bytes:
        """The log lines of noted requests, as one block of bytes: one f-string a line (the
        values that differ from request to request between the pieces of its kind), joined
        and encoded once.  Numbers are integer arithmetic: milliseconds with three decimals
        from a table of three-digit strings, no float formatting."""
        as_json, th = self.json, THOUSANDTHS
        costs, clients, no_usage = _costs, _clients, _NO_USAGE
        second_prefix = self._clock.second_prefix
        last_second, prefix = -1, ""
        to_wall = time.time() - time.perf_counter()
        out: list[str] = []
        append = out.append
        for (p0, p1, p2, p3), when, seconds, client, request_id, r in entries:
            r = r or no_usage
            millis = int((when + to_wall) * 1000)
            if millis // 1000 != last_second:
                last_second = millis // 1000
                prefix = second_prefix(last_second)
            ttfb = r.ttfb_ms
            micros = int(seconds * 1_000_000)
            cost = r.cost
            if as_json:
                ttfb_text = "null" if ttfb is None else f"{(t := round(ttfb * 1000)) // 1000}.{th[t % 1000]}"
                append(f'{p0}{prefix}{th[millis % 1000]}{p1}{request_id}{p2}'
                       f'{clients.get(client) or _client_json(client)}{p3}{ttfb_text}'
                       f',"duration_ms":{micros // 1000}.{th[micros % 1000]}'
                       f',"input_tokens":{r.input_tokens},"output_tokens":{r.output_tokens}'
                       f',"cache_read_input_tokens":{r.cache_read_input_tokens}'
                       f',"cache_creation_input_tokens":{r.cache_creation_input_tokens}'
                       f',"cost":{costs.get(cost) or _cost_text(cost)}}}\n')
            else:
                ttfb_text = "-" if ttfb is None else f"{(t := round(ttfb * 1000)) // 1000}.{th[t % 1000]}"
                append(f"{prefix}{th[millis % 1000]}{p1}{request_id}{p2}{client}{p3}{ttfb_text}"
                       f" duration_ms={micros // 1000}.{th[micros % 1000]} input_tokens={r.input_tokens}"
                       f" output_tokens={r.output_tokens} cache_read_input_tokens={r.cache_read_input_tokens}"
                       f" cache_creation_input_tokens={r.cache_creation_input_tokens}"
                       f" cost={costs.get(cost) or _cost_text(cost)}\n")
        return "".join(out).encode()

    def flush(self) -> None:
        """Write the lines of the requests noted so far (an armed timer stays: cancelling one
        costs more than the empty flush it does when it is due)."""
        entries, self.pending = self.pending, []
        if not entries:
            return
        data = self.lines(entries)
        stream = sys.stderr
        out = getattr(stream, "buffer", None)
        try:
            for chunk in ((data,) if len(data) <= PIPE_BUF else _chunks(data)):
                if out is not None:
                    out.write(chunk)
                    out.flush()         # one write(2) per chunk
                else:
                    stream.write(chunk.decode())
                    stream.flush()
        except (OSError, ValueError):
            pass        # stderr gone (closed pipe): the log cannot be written, the requests still are

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
