"""SseSplicer on its own: event boundaries kept across any network split, usage read from the
events that carry it (and only those), the model renamed in message_start, errors noticed."""
from __future__ import annotations

import json
import random

import pytest

from apertis_proxy.gateway import sse
from apertis_proxy.gateway.sse import SseSplicer
from apertis_proxy.gateway.usage import UsageMeter
from apertis_proxy.plugin_api import UsageRecord
from tests.support.rawhttp import parse_sse


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


START = event("message_start", {"type": "message_start", "message": {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001", "content": [],
    "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 7,
              "cache_creation_input_tokens": 5,
              "cache_creation": {"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 3}}}})
DELTAS = [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": t}})
          # text that mentions the watched names must not confuse the splicer
          for t in ["event: message_delta", "h\u00e9llo \u2713", "message_start\n\nevent: error", "x" * 500]]
STREAM = (START + event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
          + b"".join(DELTAS) + event("ping", {"type": "ping"})
          + event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": 9}})
          + event("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 42}})
          + event("message_future", {"type": "message_future"})      # an event type added later
          + event("message_stop", {"type": "message_stop"}))


def splice(wire: bytes, cuts: list[int], rename=None) -> tuple[list[bytes], SseSplicer, UsageRecord]:
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    splicer = SseSplicer(UsageMeter(record), rename)
    out, last = [], 0
    for cut in sorted(cuts) + [len(wire)]:
        piece = splicer.feed(wire[last:cut])
        if piece:
            out.append(piece)
        last = cut
    tail = splicer.flush()
    if tail:
        out.append(tail)
    return out, splicer, record


def assert_usage(record: UsageRecord) -> None:
    assert (record.input_tokens, record.output_tokens) == (25, 42)          # the last delta wins, no sum
    assert (record.cache_read_input_tokens, record.cache_creation_input_tokens) == (7, 5)
    assert (record.cache_creation_5m_input_tokens, record.cache_creation_1h_input_tokens) == (2, 3)
    assert record.upstream_model == "claude-haiku-4-5-20251001"


def test_every_split_keeps_bytes_and_boundaries():
    step = 7 if len(STREAM) > 2000 else 1
    for cut in range(0, len(STREAM) + 1, step):
        pieces, splicer, record = splice(STREAM, [cut])
        assert b"".join(pieces) == STREAM
        assert all(p.endswith(b"\n\n") for p in pieces)             # whole events only
        assert splicer.saw_stop and splicer.error is None
        assert_usage(record)


def test_random_splits_and_one_read():
    rng = random.Random(3)
    for _ in range(100):
        pieces, splicer, record = splice(STREAM, rng.sample(range(len(STREAM)), rng.randint(1, 60)))
        assert b"".join(pieces) == STREAM and splicer.saw_stop
        assert_usage(record)
    pieces, _, record = splice(STREAM, [])
    assert pieces == [STREAM]                                        # one read: forwarded as is
    assert_usage(record)


@pytest.mark.parametrize("wire", [STREAM.replace(b"\n", b"\r\n"), STREAM.replace(b"event: ", b"event:")],
                         ids=["crlf", "no-space"])
def test_other_legal_spellings(wire):
    pieces, splicer, record = splice(wire, [100, 101, len(wire) // 2])
    assert b"".join(pieces) == wire and splicer.saw_stop
    assert_usage(record)


def test_model_renamed_in_message_start_only():
    pieces, _, record = splice(STREAM, [50], rename=("claude-haiku-4-5-20251001", "claude-haiku-4.5"))
    out = b"".join(pieces)
    first = out.split(b"\n\n")[0]
    assert first.startswith(b"event: message_start\ndata: ")
    assert json.loads(first.split(b"data: ", 1)[1])["message"]["model"] == "claude-haiku-4.5"
    assert out[len(first):] == STREAM[len(START) - 2:]                  # the rest untouched
    assert record.upstream_model == "claude-haiku-4-5-20251001"


@pytest.mark.parametrize("sep", [b"event: error", b"event:error"])
def test_in_band_error_is_noticed(sep):
    err = sep + b'\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}\n\n'
    pieces, splicer, _ = splice(START + DELTAS[0] + err, [10])
    assert b"".join(pieces).endswith(err)
    assert splicer.error == {"type": "overloaded_error", "message": "busy"}
    assert not splicer.saw_stop


def test_unterminated_tail_waits_then_flushes():
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    splicer = SseSplicer(UsageMeter(record))
    assert splicer.feed(b"event: ping\ndata: {}") == b""
    assert splicer.feed(b"\n\nevent: pi") == b"event: ping\ndata: {}\n\n"
    assert splicer.flush() == b"event: pi\n\n"        # ended, so nothing can be glued onto it
    assert splicer.flush() == b""


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n", b"\r"])
def test_last_event_without_its_blank_line_is_ended_and_read(ending):
    """An upstream that ends its body right after message_stop's data line: the event is complete but for its
    blank line. It is ended and read like any other (message_stop seen, usage taken), not forwarded raw with
    the gateway's own error event glued on."""
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    splicer = SseSplicer(UsageMeter(record))
    body = (b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":7}}\n\n'
            b'event: message_stop\ndata: {"type":"message_stop"}' + ending)
    out = splicer.feed(body) + splicer.flush()
    assert out.startswith(body) and [name for name, _ in parse_sse(out)] == ["message_delta", "message_stop"]
    assert splicer.saw_stop and record.output_tokens == 7


def test_an_event_that_never_ends_is_refused_past_the_limit(monkeypatch):
    """Held whole until its end (never half forwarded), but not without bound: past MAX_EVENT_BYTES the
    splicer gives up on the stream."""
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 1000)
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    splicer = SseSplicer(UsageMeter(record))
    assert splicer.feed(b"event: content_block_delta\ndata: ") == b""
    for _ in range(9):
        assert splicer.feed(b"x" * 100) == b""
    with pytest.raises(sse.EventTooLarge):
        splicer.feed(b"x" * 100)


@pytest.mark.parametrize("terminator", [b"\n\n", b"\r\n\r\n", b"\r\r"])
def test_a_terminator_split_across_reads_of_a_long_event_is_found(terminator):
    """A held event is searched only where a new terminator can be, which includes one begun at the very end
    of the bytes already held."""
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    for cut in range(1, len(terminator)):
        splicer = SseSplicer(UsageMeter(record))
        event = b"event: content_block_delta\ndata: " + b"y" * 5000
        assert splicer.feed(event[:2000]) == b""
        assert splicer.feed(event[2000:] + terminator[:cut]) == b""
        assert splicer.feed(terminator[cut:] + b"event: ping") == event + terminator
        assert splicer.flush() == b"event: ping\n\n"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_read_a_byte_at_a_time_each_event_goes_out_with_the_byte_that_ends_it(eol):
    """Also a terminator spread over held reads of one byte each goes out at once, not with a later event
    (nor, held for good, at the stream's end)."""
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    splicer = SseSplicer(UsageMeter(record))
    wire, terminator = STREAM.replace(b"\n", eol), eol + eol
    out = [splicer.feed(wire[i:i + 1]) for i in range(len(wire))]
    ends = [i + 1 for i in range(len(wire)) if wire[:i + 1].endswith(terminator)]
    assert [i + 1 for i, piece in enumerate(out) if piece] == ends
    assert b"".join(out) == wire and splicer.flush() == b""
    assert_usage(record)


@pytest.mark.parametrize("bad", [2 ** 63, 2 ** 53, -5, True, 1.5, "12", None])
def test_usage_counts_out_of_range_or_of_the_wrong_type_are_ignored(bad):
    """An upstream's count that no real request has (or SQLite could not store) is ignored like a missing one:
    a single such row would otherwise fail the ledger's INSERT."""
    record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
    meter = UsageMeter(record)
    meter.apply({"input_tokens": 10, "output_tokens": 3})
    meter.apply({"input_tokens": bad, "output_tokens": bad, "cache_read_input_tokens": bad,
                 "cache_creation": {"ephemeral_5m_input_tokens": bad, "ephemeral_1h_input_tokens": bad},
                 "server_tool_use": {"web_search_requests": bad}})
    assert (record.input_tokens, record.output_tokens, record.cache_read_input_tokens) == (10, 3, 0)
    assert record.cache_creation_5m_input_tokens is None and record.cache_creation_1h_input_tokens is None
    assert record.server_tool_use is None
    meter.apply({"output_tokens": 2 ** 53 - 1, "server_tool_use": {"web_search_requests": 2, "x": "y"}})
    assert record.output_tokens == 2 ** 53 - 1 and record.server_tool_use == {"web_search_requests": 2}


SIGNED = [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "signature_delta", "signature": "c2lnbmVk"}}),
          event("content_block_start", {"type": "content_block_start", "index": 1,
                                        "content_block": {"type": "redacted_thinking", "data": "cmVkYWN0ZWQ="}})]
ERROR = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})


@pytest.mark.parametrize("thinking", [False, True])
def test_what_passes_through_is_what_feed_forwards_untouched(thinking):
    """passes_through() is feed()'s shortcut for a read of whole events: whenever it says yes, feed()
    returns those very bytes and notes nothing (no usage, no stop, no error, no signature)."""
    events = [*parse_events(STREAM), *SIGNED, ERROR, b"event: ping\r\ndata: {}\r\n\r\n", b"data: x\n\n",
              b"event:message_delta\ndata: {\"usage\": {\"output_tokens\": 3}}\n\n"]
    reads = events + [a + b for a in events for b in events[:4]]
    passed = 0
    for read in reads:
        record = UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")
        noted: list[str] = []
        meter = UsageMeter(record)
        splicer = SseSplicer(meter)
        if thinking:
            splicer._signatures = noted.append
        framed = b"%x\r\n" % len(read) + read + b"\r\n"     # as a chunk: the framing holds no marker
        if not splicer.passes_through(framed):
            continue
        passed += 1
        assert splicer.feed(read) is read
        assert (record.raw_usage, splicer.saw_stop, splicer.error, noted) == (None, False, None, [])
    assert passed >= 10
    # Each event the splicer reads is refused, on its own and after another.
    for read in [START, ERROR, *(e for e in events if b"message_" in e.split(b"\n", 1)[0]),
                 DELTAS[0] + event("message_stop", {"type": "message_stop"})]:
        assert not SseSplicer(UsageMeter(UsageRecord(request_id="r", started_at=0.0,
                                                     endpoint="/v1/messages"))).passes_through(read)
    hooked = SseSplicer(UsageMeter(UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")))
    hooked._signatures = print
    assert not any(hooked.passes_through(e) for e in SIGNED)


def test_nothing_passes_through_while_an_event_is_held():
    splicer = SseSplicer(UsageMeter(UsageRecord(request_id="r", started_at=0.0, endpoint="/v1/messages")))
    assert splicer.feed(DELTAS[1][:10]) == b""
    assert not splicer.passes_through(DELTAS[1][10:])
    assert splicer.feed(DELTAS[1][10:]) == DELTAS[1]


def parse_events(stream: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in stream.split(b"\n\n") if e]
