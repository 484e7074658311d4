"""Upstream body framing decoders, fed every possible split of the wire bytes."""
from __future__ import annotations

import random

import pytest

from apertis_proxy.upstream.framing import (ChunkedDecoder, CloseDecoder, FramingError, LengthDecoder,
                                            decoder_for)

EVENTS = [b"event: ping\ndata: {\"type\": \"ping\"}\n\n", "data: h\u00e9llo \u2713\n\n".encode(), b"x" * 300]


def chunked(pieces, trailer=b""):
    return b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n" + trailer + b"\r\n"


def feed_all(decoder, wire, cuts):
    out, last = [], 0
    for cut in sorted(cuts) + [len(wire)]:
        out.append(decoder.feed(wire[last:cut]))
        last = cut
    return b"".join(out)


@pytest.mark.parametrize("trailer", [b"", b"x-trailer: 1\r\n"])
def test_chunked_every_single_split(trailer):
    wire = chunked(EVENTS, trailer)
    for cut in range(len(wire) + 1):
        d = ChunkedDecoder()
        assert feed_all(d, wire, [cut]) == b"".join(EVENTS)
        assert d.done and d.leftover == b""


def test_chunked_random_splits_and_extensions():
    rng = random.Random(7)
    wire = chunked(EVENTS * 20).replace(b"\r\n", b";ext=1\r\n", 1)
    for _ in range(200):
        d = ChunkedDecoder()
        cuts = rng.sample(range(len(wire)), rng.randint(1, 40))
        assert feed_all(d, wire, cuts) == b"".join(EVENTS * 20)
        assert d.done


def test_chunked_one_read_is_one_piece():
    d = ChunkedDecoder()
    assert d.feed(chunked(EVENTS)) == b"".join(EVENTS)   # coalesced: one splice, one write


def test_chunked_leftover_marks_extra_bytes():
    d = ChunkedDecoder()
    d.feed(chunked([b"abc"]) + b"HTTP/1.1 200")
    assert d.done and d.leftover == b"HTTP/1.1 200"


@pytest.mark.parametrize("wire", [b"zz\r\nabc\r\n", b"3\r\nabcXY", b"1" * 2000])
def test_chunked_malformed(wire):
    with pytest.raises(FramingError):
        ChunkedDecoder().feed(wire)


def test_chunked_truncated_is_an_error_at_eof():
    d = ChunkedDecoder()
    d.feed(b"5\r\nab")
    with pytest.raises(FramingError):
        d.eof()


def test_length_and_close_delimited():
    d = LengthDecoder(5)
    assert d.feed(b"ab") == b"ab" and not d.done
    assert d.feed(b"cdeEXTRA") == b"cde" and d.done and d.leftover == b"EXTRA"
    c = CloseDecoder()
    assert c.feed(b"abc") == b"abc" and not c.done
    c.eof()
    assert c.done


def test_decoder_choice():
    assert isinstance(decoder_for(200, [(b"transfer-encoding", b"chunked")]), ChunkedDecoder)
    assert isinstance(decoder_for(200, [(b"content-length", b"3")]), LengthDecoder)
    assert isinstance(decoder_for(200, []), CloseDecoder)
    assert decoder_for(204, []).done


@pytest.mark.parametrize("size", [b"0x3", b"+3", b"-3", b"1_0", b" ", b"3 3", b"12345678901234567"])
def test_chunk_sizes_are_strict_hex(size):
    """int(x, 16) alone would take several of these; a chunk size is hex digits only."""
    with pytest.raises(FramingError):
        ChunkedDecoder().feed(size + b"\r\nabc\r\n0\r\n\r\n")


def test_chunk_size_with_extension_and_padding():
    d = ChunkedDecoder()
    assert d.feed(b"3 ;name=value\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n") == b"abc0123456789"
    assert d.done


def test_bulk_reads_of_many_chunks():
    """A stream sent in bulk: hundreds of small chunks per read, decoded in whole-list passes;
    data holding CRLF, an extension or the last chunk inside a large read fall back to the loop."""
    events = [b"event: content_block_delta\ndata: {\"i\": %d}\n\n" % i for i in range(300)]
    odd = list(events)
    odd[150] = b"data: crlf\r\ninside\r\n\r\n"
    rng = random.Random(11)
    for pieces in (events, odd):
        wire = chunked(pieces)
        for cuts in ([], [len(wire) // 2], rng.sample(range(len(wire)), 5), list(range(4096, len(wire), 4096))):
            d = ChunkedDecoder()
            assert feed_all(d, wire, cuts) == b"".join(pieces)
            assert d.done and d.leftover == b""
    wire = chunked(events).replace(b"\r\n", b";x=1\r\n", 1)
    assert ChunkedDecoder().feed(wire) == b"".join(events)


@pytest.mark.parametrize("bad", [b"0x2f", b"+2f", b"2_f"])
def test_bulk_reads_keep_sizes_strict(bad):
    events = [b"x" * 0x2f] * 200
    wire = chunked(events).replace(b"\r\n2f\r\n", b"\r\n" + bad + b"\r\n", 1)
    with pytest.raises(FramingError):
        ChunkedDecoder().feed(wire)
