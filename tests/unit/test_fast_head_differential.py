"""The fast head parsers against h11, their oracle, with hypothesis.

Heads are generated valid (the shapes real clients and upstreams send, with the variations the grammar allows),
then mutated and made hostile (every smuggling shape tests/e2e/test_smuggling.py knows, bare LF, obs-fold, NUL,
duplicate, listed or signed Content-Length, Transfer-Encoding variants, oversized values, bytes inserted, deleted
or replaced anywhere). For each: whenever the fast parser accepts a head, h11 reads the same bytes the same way
(method or status, target, version, headers as the code sees them, where the head ends, the body's framing);
whenever h11 refuses, the fast parser has declined; a head cut anywhere before its end is declined (it goes to
h11 whole, as before), and h11 reads it the same way fed one byte at a time.

Profiles: `ci` (the default: a fixed number of examples, derandomized, a few seconds) and `campaign` (many more
examples, random each run):
APERTIS_HYPOTHESIS_PROFILE=campaign python -m pytest tests/unit/test_fast_head_differential.py
(APERTIS_HYPOTHESIS_EXAMPLES sets the count). .ci/h11-range runs this file against the lowest and the newest h11
setup.cfg allows.
"""
from __future__ import annotations

import os

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import currently_in_test_context
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from apertis_proxy.http import fast_head
from apertis_proxy.http.heads import header_list, keeps_alive
from apertis_proxy.http.protocol import framing_refusal
from apertis_proxy.http.head_check import difference, fast_reading, h11_request, h11_response
from apertis_proxy.upstream.connection import response_refusal
from apertis_proxy.upstream.framing import decoder_for, framed_decoder
from tests.support.smuggling_vectors import VECTORS

settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("campaign", max_examples=int(os.environ.get("APERTIS_HYPOTHESIS_EXAMPLES", "200000")),
                          deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("APERTIS_HYPOTHESIS_PROFILE", "ci"))

MAX_HEAD = 4096        # the server's max_header_bytes here: small, so that oversized heads are cheap
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VISIBLE = bytes(range(0x21, 0x7F))
# What the official SDK sends, and what an Anthropic response carries: the names the generator favours.
COMMON_REQUEST_NAMES = ["Accept", "Accept-Encoding", "Connection", "User-Agent", "X-Stainless-Lang",
                        "x-stainless-retry-count", "anthropic-version", "x-api-key", "Authorization",
                        "content-type", "anthropic-beta", "X-Forwarded-For"]
COMMON_RESPONSE_NAMES = ["Date", "Content-Type", "Content-Length", "Connection", "request-id", "cf-ray",
                         "anthropic-ratelimit-requests-limit", "anthropic-ratelimit-tokens-reset", "Server",
                         "Transfer-Encoding", "x-robots-tag", "via", "Keep-Alive"]
# Lines that some parser reads differently from another: what smuggling is made of.
HOSTILE_LINES = [
    b"transfer-encoding: chunked", b"Transfer-Encoding: Chunked", b"transfer-encoding: CHUNKED",
    b"transfer-encoding: identity, chunked", b"transfer-encoding: xchunked", b"transfer-encoding : chunked",
    b"transfer-encoding:\tchunked", b"transfer-encoding: gzip", b"transfer-encoding: chunked, gzip",
    b"transfer-encoding:", b" chunked", b"\tchunked", b" transfer-encoding: chunked",
    b"content-length: 5", b"content-length: 0", b"content-length: 5, 5", b"content-length: 5, 6",
    b"content-length: +5", b"content-length: -1", b"content-length: 0x5", b"content-length: 5 ", b"content-length:",
    b"content-length: 1_0", b"content-length: \xd9\xa5", b"Content-Length: 00000000000000000000000000000005",
    b"content-length: 99999999999999999999", b"content-length : 5",
    b"host: other", b"Host:", b"x-note: a\x00b", b"x-note: a\rb", b"x-note: a\nb", b"x note: a", b": empty-name",
    b"x-note: \x7f", b"x-note: caf\xc3\xa9", b"x-note: \x01", b"expect: 100-continue", b"upgrade: websocket",
    b"connection: close", b"connection: keep-alive, Upgrade", b"x-long: " + b"a" * 4096,
    b"x-near: " + b"c" * 3900, b"x-longer: " + b"b" * 17000,
]


def fast_request(data: bytes):
    return fast_head.parse_request(data, MAX_HEAD)


INSERTED_BYTES = b"\x00\r\n \t:,;\x7f\x80\xff+-0/?#\x0b\x0c"


def tokens(names: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(names), st.text(TOKEN_CHARS, min_size=1, max_size=20)).map(str.encode)


def values() -> st.SearchStrategy[bytes]:
    inner = st.binary(min_size=0, max_size=40).map(lambda b: bytes(VISIBLE[c % len(VISIBLE)] for c in b))
    ows = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t"])
    spaced = st.lists(inner.filter(bool), min_size=0, max_size=3).flatmap(
        lambda words: st.sampled_from([b" ", b"\t", b"  "]).map(lambda sep: sep.join(words)))
    return st.tuples(ows, st.one_of(inner, spaced, st.from_regex(rb"[0-9]{1,20}", fullmatch=True)), ows).map(
        lambda t: t[0] + t[1] + t[2])


def header_lines(names: list[str]) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.tuples(tokens(names), values()).map(lambda nv: nv[0] + b":" + nv[1]), max_size=30)


@st.composite
def request_heads(draw) -> bytes:
    # Mostly what the fast parser takes, sometimes what it leaves to h11 (repeats weigh the choice).
    method = draw(st.sampled_from([b"POST"] * 4 + [b"GET"] * 3 + [b"HEAD", b"DELETE", b"PUT", b"PATCH", b"OPTIONS",
                                                                  b"CONNECT", b"get", b"BREW"]))
    path = draw(st.binary(max_size=60).map(lambda b: bytes(VISIBLE[c % len(VISIBLE)] for c in b)))
    target = draw(st.sampled_from([b"/"] * 3 + [b"/v1/messages"] * 3 + [b"http://host/v1/messages", b"*", b""])) + path
    version = draw(st.sampled_from([b"1.1"] * 6 + [b"1.0", b"1.0", b"2.0", b"0.9"]))
    lines = draw(header_lines(COMMON_REQUEST_NAMES))
    if draw(st.integers(0, 9)):
        lines.insert(draw(st.integers(0, len(lines))), b"host: 127.0.0.1:8080")
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), b"content-length: %d" % draw(st.integers(0, 2000)))
    return method + b" " + target + b" HTTP/" + version + b"\r\n" + b"".join(line + b"\r\n" for line in lines)


@st.composite
def response_heads(draw) -> bytes:
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0", b"2.0"]))
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 400, 429, 500, 529, 599, 100, 101, 103, 199, 600, 99]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Too Many Requests", b" x\ty"]))
    lines = draw(header_lines(COMMON_RESPONSE_NAMES))
    framing = draw(st.sampled_from([b"content-length: %d" % draw(st.integers(0, 2000)), b"transfer-encoding: chunked",
                                    b"Transfer-Encoding: chunked", None]))
    if framing is not None:
        lines.insert(draw(st.integers(0, len(lines))), framing)
    return b"HTTP/%s %d%s\r\n" % (version, status, reason) + b"".join(line + b"\r\n" for line in lines)


@st.composite
def mutated(draw, heads: st.SearchStrategy[bytes]) -> bytes:
    """A head with hostile lines and byte edits, ended (or not) by a blank line, with a body or more after it."""
    head = draw(heads)
    lines = head.split(b"\r\n")
    for _ in range(draw(st.integers(0, 3))):
        lines.insert(draw(st.integers(1, len(lines))), draw(st.sampled_from(HOSTILE_LINES)))
    data = bytearray(b"\r\n".join(lines))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["insert", "delete", "replace", "bare-lf"]))
        byte = draw(st.sampled_from(INSERTED_BYTES))
        if how == "insert":
            data[pos:pos] = bytes([byte])
        elif how == "delete":
            del data[pos:pos + 1]
        elif how == "replace":
            data[pos:pos + 1] = bytes([byte])
        else:
            found = data.find(b"\r\n", pos)
            if found >= 0:
                del data[found]
    return bytes(data) + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b""])) + draw(
        st.sampled_from([b"", b"hello", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"\r\n"]))


def whole(heads: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.tuples(heads, st.sampled_from([b"", b"{\"a\":1}", b"GET / HTTP/1.1\r\n"])).map(
        lambda hb: hb[0] + b"\r\n" + hb[1])


# -- the properties ---------------------------------------------------------------------------------------------

def note_event(name: str) -> None:
    """Count accepted and declined heads (pytest --hypothesis-show-statistics shows the split)."""
    if currently_in_test_context():
        hypothesis_event(name)


def assert_request_agrees(data: bytes) -> None:
    fast = fast_request(data)
    oracle = h11_request(data, MAX_HEAD)
    note_event("fast path: " + ("declined" if fast is None else "accepted"))
    if fast is None:
        return
    reading = fast_reading(fast)
    assert difference(reading, oracle) is None, (data, difference(reading, oracle))
    assert fast.keep_alive == keeps_alive(fast.http_version, fast.headers)
    # The server's checks on an h11 head (size: its bytes to the blank line; framing as sent) that the fast
    # path skips would pass.
    assert fast.end <= MAX_HEAD
    assert framing_refusal(data, False) is None
    assert_request_framing(data, fast)
    assert_declined_until_whole(data, fast.end, fast_request)
    # Fed one byte at a time, h11 reads it the same way.
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    for i in range(fast.end):
        assert conn.next_event() is h11.NEED_DATA
        conn.receive_data(data[i:i + 1])
    event = conn.next_event()
    assert (event.method, event.target, event.http_version, header_list(event.headers)) == reading[:4]


def assert_request_framing(data: bytes, fast: fast_head.FastRequest) -> None:
    """h11 frames the body by what the protocol reads from the fast head: Content-Length, or none."""
    length = int(dict(fast.headers).get(b"content-length", b"0"))
    assert fast.length == length
    body = b"x" * length
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data[:fast.end] + body + b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
    assert type(conn.next_event()) is h11.Request
    received = b""
    while type(event := conn.next_event()) is h11.Data:
        received += event.data
    assert type(event) is h11.EndOfMessage and received == body
    assert conn.trailing_data[0].startswith(b"GET /next")
    # The server keeps a connection alive by keeps_alive() of the same version and headers on both paths;
    # it never keeps one h11 would close.
    if conn.their_state is h11.MUST_CLOSE:
        assert not keeps_alive(fast.http_version, fast.headers)


def assert_response_agrees(data: bytes) -> None:
    fast = fast_head.parse_response(data)
    oracle = h11_response(data)
    note_event("fast path: " + ("declined" if fast is None else "accepted"))
    if fast is None:
        return
    reading = fast_reading(fast)
    assert difference(reading, oracle) is None, (data, difference(reading, oracle))
    assert 200 <= fast.status_code < 600
    # The upstream client's checks on an h11 head (status range, value bytes, framing by version) would pass.
    assert response_refusal(fast.status_code, fast.http_version, fast.headers) is None
    names = [name for name, _ in fast.headers]
    assert names.count(b"transfer-encoding") + names.count(b"content-length") <= 1
    # The keep-alive and the body framing the parser read by name are what a pass over the headers reads.
    assert fast.keep_alive == keeps_alive(fast.http_version, fast.headers)
    framed = framed_decoder(fast.status_code, fast.chunked, fast.length)
    full = decoder_for(fast.status_code, fast.headers)
    assert (type(framed), vars_of(framed)) == (type(full), vars_of(full))
    assert_declined_until_whole(data, fast.end, fast_head.parse_response)


def vars_of(decoder) -> dict:
    return {name: getattr(decoder, name) for cls in type(decoder).__mro__
            for name in getattr(cls, "__slots__", ()) if hasattr(decoder, name)}


def assert_declined_until_whole(data: bytes, end: int, parse) -> None:
    """A head cut before its end is declined: the server leaves it to h11, whatever follows."""
    for cut in range(end):
        assert parse(data[:cut]) is None, (data, cut)


def assert_h11_refusals_declined(data: bytes, oracle, parse) -> None:
    if isinstance(oracle, str):
        assert parse(data) is None, (data, oracle)


@given(whole(request_heads()))
@example(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-A:  a b \t\r\nx-e:\r\n\r\n{}")
@example(b"GET / HTTP/1.0\r\n\r\n")
def test_valid_request_heads_read_as_h11_reads_them(data):
    assert_request_agrees(data)
    assert_h11_refusals_declined(data, h11_request(data, MAX_HEAD), fast_request)


@given(mutated(request_heads()))
def test_mutated_request_heads_are_declined_or_read_as_h11_reads_them(data):
    assert_request_agrees(data)
    assert_h11_refusals_declined(data, h11_request(data, MAX_HEAD), fast_request)


@given(whole(response_heads()))
@example(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
@example(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
def test_valid_response_heads_read_as_h11_reads_them(data):
    assert_response_agrees(data)
    assert_h11_refusals_declined(data, h11_response(data), fast_head.parse_response)


@given(mutated(response_heads()))
def test_mutated_response_heads_are_declined_or_read_as_h11_reads_them(data):
    assert_response_agrees(data)
    assert_h11_refusals_declined(data, h11_response(data), fast_head.parse_response)


def lower_names(data: bytes) -> bytes:
    """The head with every header name lower-cased (as most APIs write them): the parsers' other branch."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    first, *lines = head.split(b"\r\n")
    return b"\r\n".join([first, *(name.lower() + colon + value for name, colon, value in
                                    (line.partition(b":") for line in lines))]) + sep + rest


@given(whole(request_heads()).map(lower_names))
def test_request_heads_with_lower_case_names_read_as_h11_reads_them(data):
    assert_request_agrees(data)
    assert_h11_refusals_declined(data, h11_request(data, MAX_HEAD), fast_request)


@given(whole(response_heads()).map(lower_names))
@example(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: r\r\ncontent-length: 2\r\n\r\n{}")
def test_response_heads_with_lower_case_names_read_as_h11_reads_them(data):
    assert_response_agrees(data)
    assert_h11_refusals_declined(data, h11_response(data), fast_head.parse_response)


def strict_fields(data: bytes, start: int, stop: int):
    """What the strict pattern alone reads from the header lines in data[start:stop]; None if it declines."""
    pairs = fast_head._FIELD_RE.findall(data, start, stop)
    lines = data.count(b"\r\n", start, stop)
    if len(pairs) != lines or data.count(b"\n", start, stop) != lines:
        return None
    lowered = [name.lower() for name, _ in pairs]
    return [(name, value) for name, (_, value) in zip(lowered, pairs)], lowered


@given(mutated(request_heads()) | mutated(response_heads()))
@example(b"GET / HTTP/1.1\r\nx-a: b \r\nx-b:\t\r\nx-c:  \r\nx-d:\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nx-a: b\rc\r\nx b: c\r\nx-c: \x7f\r\n\r\n")
def test_the_loose_split_reads_what_the_strict_pattern_reads(data):
    # _fields splits lines with a loose pattern and checks names and values in bulk; wherever it accepts,
    # the strict pattern (the grammar the parsers are proved on) reads the same lines the same way.
    start = data.find(b"\r\n") + 2
    stop = data.find(b"\r\n\r\n") + 2
    if start < 2 or stop < start:
        return
    lines = data.count(b"\n", start, stop)
    loose = fast_head._split_fields(fast_head._LOOSE_FIELD_RE.findall(data, start, stop), lines) if lines else None
    note_event("loose split: " + ("declined" if loose is None else "accepted"))
    if loose is not None:
        assert loose == strict_fields(data, start, stop)
    assert fast_head._fields(data, start, stop) == (strict_fields(data, start, stop) if lines else ([], []))


@pytest.mark.parametrize("vector", list(VECTORS.values()), ids=list(VECTORS))
def test_every_smuggling_vector_goes_to_h11(vector):
    assert fast_request(vector) is None


def test_the_sdk_head_is_taken():
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: gzip, deflate\r\n"
            b"Connection: keep-alive\r\nAccept: application/json\r\nX-Stainless-Lang: python\r\n"
            b"anthropic-version: 2023-06-01\r\nx-api-key: sk-test\r\ncontent-type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}")
    fast = fast_request(head)
    assert fast is not None and fast.end == len(head) - 2
    assert (b"x-stainless-lang", b"python") in fast.headers and (b"content-length", b"2") in fast.headers
    assert_request_agrees(head)
