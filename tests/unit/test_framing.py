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


def test_one_chunk_takes_a_read_that_is_exactly_one_whole_chunk():
    """The paced stream's read: recognised without decoding, the state left as it was."""
    d = ChunkedDecoder()
    for event in EVENTS + [b"y" * 0x1000]:
        wire = chunked([event])[:-5]            # one chunk, without the last one
        start = d.one_chunk(wire)
        assert wire[start:-2] == event
    assert d.feed(b"0\r\n\r\n") == b"" and d.done
    assert d.one_chunk(chunked([b"abc"])[:-5]) == 0     # after the body's end: nothing is one chunk


@pytest.mark.parametrize("wire", [
    b"0\r\n\r\n",                               # the last chunk
    b"3\r\nabc\r\n3\r\ndef\r\n",                # two chunks
    b"3\r\nab", b"3\r\nabc", b"3\r\nabc\r",     # a chunk cut short
    b"3\r\nabcd\r\n", b"4\r\nabc\r\n",          # a size that does not match
    b"A\r\n0123456789\r\n", b"03\r\nabc\r\n",   # sizes written otherwise (feed() reads them)
    b"3;x=1\r\nabc\r\n", b"0x3\r\nabc\r\n", b"+3\r\nabc\r\n", b"-3\r\nabc\r\n",
    b"abc\r\n", b"\r\n\r\n",
])
def test_one_chunk_leaves_anything_else_to_feed(wire):
    d = ChunkedDecoder()
    assert d.one_chunk(wire) == 0


def test_one_chunk_only_at_a_chunk_boundary():
    """Mid-chunk, a read that looks like a whole chunk is the rest of the one begun."""
    d = ChunkedDecoder()
    assert d.feed(b"9\r\nab") == b"ab"
    assert d.one_chunk(b"2\r\nab\r\n") == 0
    assert d.feed(b"2\r\nab\r\n") == b"2\r\nab\r\n" and d.one_chunk(b"1\r\nz\r\n") == 0   # its CRLF still due
    assert d.feed(b"\r\n") == b"" and d.one_chunk(b"1\r\nz\r\n") == 3
