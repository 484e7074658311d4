"""h11's reading of a head, to hold the fast parsers (fast_head.py) against.

The debug setting `[server] fast_heads_check` has every head the fast path
accepted parsed by h11 too and logs any difference; the differential tests use
the same readings.  A logged head never shows a credential's value.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import h11

from .fast_head import FastRequest, FastResponse
from .heads import header_list

log = logging.getLogger("apertis_proxy.http")

# (method or status, target or b"", version, headers, where the head ends), or the error h11 raised.
Reading = tuple[Union[bytes, int], bytes, bytes, list[tuple[bytes, bytes]], int]
_SECRET_HEADERS = frozenset((b"authorization", b"x-api-key", b"proxy-authorization", b"cookie"))
# What a client-side h11 is told went out, so that it reads any response (a 1xx included).
_SENT = h11.Request(method=b"POST", target=b"/", headers=[(b"host", b"upstream"), (b"content-length", b"0")])


def h11_request(data: bytes, max_head: int) -> Union[Reading, str, None]:
    """How the server's h11 reads the request head at the start of `data`:
    a Reading, the error it raises, or None while it needs more data."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return f"error: {exc}"
    if type(event) is not h11.Request:
        return None
    end = len(data) - len(conn.trailing_data[0])
    return event.method, event.target, event.http_version, header_list(event.headers), end


def h11_response(data: bytes) -> Union[Reading, str, None]:
    """How the upstream client's h11 reads the response head at the start of `data` (a 1xx counts as a head)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(_SENT)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return f"error: {exc}"
    if type(event) not in (h11.Response, h11.InformationalResponse):
        return None
    end = len(data) - len(conn.trailing_data[0])
    return event.status_code, b"", event.http_version, header_list(event.headers), end


def fast_reading(head: Union[FastRequest, FastResponse]) -> Reading:
    if isinstance(head, FastRequest):
        return head.method, head.target, head.http_version, head.headers, head.end
    return head.status_code, b"", head.http_version, head.headers, head.end


def difference(fast: Reading, oracle: Union[Reading, str, None]) -> Optional[str]:
    """What differs between the fast reading and h11's, with credentials' values hidden; None if nothing."""
    if oracle == fast:
        return None
    if not isinstance(oracle, tuple):
        return f"fast path accepted, h11 gives {oracle or 'an incomplete head'}"
    fields = ("method or status", "target", "version", "headers", "head length")
    diffs = [f"{name}: fast {_shown(a)} vs h11 {_shown(b)}" for name, a, b in zip(fields, fast, oracle) if a != b]
    return "; ".join(diffs)


def check(kind: str, fast: Union[FastRequest, FastResponse], oracle: Union[Reading, str, None]) -> None:
    """Log a warning when h11 reads the head the fast path accepted differently."""
    diff = difference(fast_reading(fast), oracle)
    if diff is not None:
        log.warning("fast %s head parser disagrees with h11: %s", kind, diff)


def _shown(value: object) -> str:
    if isinstance(value, list):
        return repr([(name, b"<hidden>" if name.lower() in _SECRET_HEADERS else v) for name, v in value])
    return repr(value)
