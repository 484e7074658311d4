"""SSE lines may end in CRLF, LF or CR, and one stream may mix them (the event-stream grammar: `end-of-line =
( cr lf / cr / lf )`): an event ends at the first empty line, however its last line and that empty line end.  The
splicer forwards each event as soon as it has ended, whatever the mix, and reads the usage it carries."""
from __future__ import annotations

import pytest

from apertis_proxy.gateway.sse import SseSplicer
from apertis_proxy.gateway.usage import UsageMeter
from apertis_proxy.plugin_api import UsageRecord

DELTA = b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":9}}'


def splicer() -> tuple[SseSplicer, UsageRecord]:
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    return SseSplicer(UsageMeter(record)), record


@pytest.mark.parametrize("ending", [b"\n\r\n", b"\n\r", b"\r\n\n", b"\n\n", b"\r\n\r\n", b"\r\r"],
                         ids=["lf+crlf", "lf+cr", "crlf+lf", "lf+lf", "crlf+crlf", "cr+cr"])
def test_an_event_ended_by_any_pair_of_line_endings_goes_out_at_once(ending):
    s, record = splicer()
    wire = DELTA + ending
    out = s.feed(wire)
    assert out == wire, f"{ending!r}: forwarded {out!r} of {len(wire)} bytes; the event is held"
    assert record.output_tokens == 9


@pytest.mark.parametrize("ending", [b"\n\r\n", b"\n\r"], ids=["lf+crlf", "lf+cr"])
def test_a_stream_of_such_events_is_not_held_until_its_end(ending):
    """Each read holds one whole event: each goes out with its read, as on an LF-only stream."""
    s, _ = splicer()
    ping = b'event: ping\ndata: {"type": "ping"}' + ending
    held = [i for i in range(5) if not s.feed(ping)]
    assert not held, f"reads {held} of 5 forwarded nothing"
