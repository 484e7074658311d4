"""The fast head path end to end: the official SDKs' requests and the upstream's answers skip h11; a body that
arrives after its head is still served on the fast path, with the body limit and timeout of the h11 path; the
setting turns it off; the counters show which parser read each head, also on GET /metrics; the check mode
parses each head both ways and logs no difference, and never a credential.

The parsers' equivalence with h11 is proved in test_fast_head_differential.py; the request-smuggling refusals
run on both paths in test_smuggling.py."""
from __future__ import annotations

import asyncio
import logging

import pytest

from apertis_proxy.http import head_check
from apertis_proxy.http.fast_head import COUNTS, parse_request
from apertis_proxy.http.request import Request
from apertis_proxy.upstream.connection import UpstreamConnection, UpstreamError
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.metrics import scrape_samples, value
from tests.support.smuggling_vectors import BODY
from tests.support.scripted_upstream import BODY as UPSTREAM_BODY
from tests.support.scripted_upstream import OK, ScriptedUpstream, connect, exchange


def counts() -> dict[str, int]:
    return {name: getattr(COUNTS, name) for name in COUNTS.__slots__}


def moved(before: dict[str, int]) -> dict[str, int]:
    """How far each counter moved since `before` (zeros left out)."""
    return {name: n - before[name] for name, n in counts().items() if n != before[name]}


def messages_request(key: str, body: bytes = BODY) -> bytes:
    return request_bytes("POST", "/v1/messages", [("x-api-key", key), ("anthropic-version", "2023-06-01"),
                                                  ("content-type", "application/json")], body)


async def test_sdk_requests_and_upstream_answers_take_the_fast_path(sdk, gateway):
    before = counts()
    result = await sdk.run("plain", gateway.base_url, gateway.key, text="fast heads")
    assert "error" not in result, result
    # Every client kind, the sync ones that write head and body apart included.
    assert moved(before) == {"request_fast": 1, "response_fast": 1}


async def test_body_arriving_after_its_head_is_served_on_the_fast_path(gateway):
    request = messages_request(gateway.key)
    split = request.index(b"\r\n\r\n") + 4
    before = counts()
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(request[:split])
        await asyncio.sleep(0.05)       # the head on its own, as the SDK's sync client writes it
        await conn.send(request[split:split + 10])
        await asyncio.sleep(0.05)
        # The rest of the body with a pipelined request behind it.
        await conn.send(request[split + 10:] + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        response = await conn.read_response()
        assert response.status == 200, response.body
        assert response.json()["type"] == "message"
        assert (await conn.read_response(method="GET")).status == 200
    assert gateway.mock.last_request.raw_body == BODY
    # The pipelined GET was already buffered when its cycle began: h11 reads it, as before.
    assert moved(before) == {"request_fast": 1, "request_h11": 1, "response_fast": 1}


@pytest.mark.parametrize("gateway", [{"body_timeout": 0.3}], indirect=True)
async def test_fast_path_body_that_stalls_times_out(gateway):
    request = messages_request(gateway.key)
    before = counts()
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(request[:-10])
        response = await conn.read_response()
        assert response.status == 408 and response.json()["error"]["type"] == "timeout_error"
        assert response.header("connection") == "close"
        assert await conn.wait_closed_by_peer(timeout=5)
    assert moved(before) == {"request_fast": 1}
    assert gateway.mock.requests == []


@pytest.mark.parametrize("gateway", [{"max_body_bytes": 64}], indirect=True)
async def test_fast_path_body_over_the_limit_is_refused_before_it_is_read(gateway):
    before = counts()
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(messages_request(gateway.key)[:-len(BODY)])      # the head only: refused on its length
        response = await conn.read_response()
        assert response.status == 413 and response.json()["error"]["type"] == "request_too_large"
        assert response.header("connection") == "close"
    assert moved(before) == {"request_fast": 1}
    assert gateway.mock.requests == []


@pytest.mark.parametrize("gateway", [{"fast_heads": False}], indirect=True)
async def test_setting_turns_the_fast_path_off(gateway):
    before = counts()
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(messages_request(gateway.key))
        assert (await conn.read_response()).status == 200
    assert moved(before) == {"request_h11": 1, "response_h11": 1}


async def test_irregular_heads_fall_back_to_h11(gateway):
    before = counts()
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        request = messages_request(gateway.key)
        split = request.index(b"\r\n") + 2
        await conn.send(request[:split])            # a head in two reads
        await asyncio.sleep(0.05)
        await conn.send(request[split:])
        assert (await conn.read_response()).status == 200
        await conn.send(request.replace(b"x-api-key:", b"x-api-key:\t ", 1).replace(b"\r\n", b"\n"))    # bare LF
        assert (await conn.read_response()).status == 200
    assert moved(before) == {"request_h11": 2, "response_fast": 2}


async def test_metrics_show_heads_by_parser(gateway):
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        await conn.send(messages_request(gateway.key))
        assert (await conn.read_response()).status == 200
    before = counts()
    samples = await scrape_samples(gateway.base_url)
    before["request_fast"] += 1         # the scrape's own request
    for name in ("request_fast", "request_h11", "response_fast", "response_h11"):
        side, parser = name.split("_")
        assert value(samples, "apertis_http_heads_total", side=side, parser=parser) == before[name]
    assert before["request_fast"] >= 1 and before["response_fast"] >= 1


@pytest.mark.parametrize("gateway", [{"fast_heads_check": True}], indirect=True)
async def test_check_mode_finds_the_parsers_agree(gateway, caplog):
    before = counts()
    with caplog.at_level(logging.WARNING, logger="apertis_proxy.http"):
        async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
            await conn.send(messages_request(gateway.key))
            assert (await conn.read_response()).status == 200
    assert moved(before) == {"request_fast": 1, "response_fast": 1}
    assert not [r for r in caplog.records if "disagrees" in r.getMessage()]


def test_a_difference_is_logged_without_credentials(caplog):
    head = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: sk-secret-1\r\nAuthorization: Bearer sk-secret-2"
            b"\r\ncontent-length: 0\r\n\r\n")
    fast = parse_request(head, 65536)
    assert fast is not None
    method, target, version, headers, end = head_check.h11_request(head, 65536)
    other = [(name, value + b"x") for name, value in headers]       # a reading that differs in every value
    with caplog.at_level(logging.WARNING, logger="apertis_proxy.http"):
        head_check.check("request", fast, (method, target, version, other, end))
    [record] = caplog.records
    text = record.getMessage()
    assert "disagrees" in text and "headers" in text and "b'xx'" in text     # host differs: shown
    assert "sk-secret" not in text and "Bearer" not in text


CHUNKED = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%s: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n")


@pytest.mark.parametrize("script,parsers", [
    ([OK], {"response_fast": 2}),
    ([CHUNKED % (b"transfer-encoding", len(UPSTREAM_BODY), UPSTREAM_BODY)], {"response_fast": 2}),
    # h11 reads these: a value it lower-cases, an interim response, a head split over reads.
    ([CHUNKED % (b"Transfer-Encoding: x\r\nx-y", len(UPSTREAM_BODY), UPSTREAM_BODY)], None),
    ([CHUNKED.replace(b": chunked", b": Chunked") % (b"transfer-encoding", len(UPSTREAM_BODY), UPSTREAM_BODY)],
     {"response_h11": 1, "response_fast": 1}),
    ([b"HTTP/1.1 100 Continue\r\n\r\n", OK], {"response_h11": 1, "response_fast": 1}),
    ([OK[:20], OK[20:]], {"response_h11": 1, "response_fast": 1}),
], ids=["length", "chunked", "bad-transfer-encoding", "chunked-capitalised", "interim-first", "split-head"])
async def test_upstream_heads_fast_or_h11(script, parsers):
    """The upstream client reads each head with the parser the shape calls for, with the same result."""
    before = counts()
    async with ScriptedUpstream([script, [OK]]) as upstream:
        conn = await connect(upstream.port)
        if parsers is None:                 # h11 refuses it: an upstream error, as without the fast path
            with pytest.raises(UpstreamError):
                await exchange(conn)
            conn.close()
            assert moved(before) == {}
            return
        assert await exchange(conn) == (200, UPSTREAM_BODY)
        assert conn.recycle()
        assert await exchange(conn) == (200, UPSTREAM_BODY)
        conn.close()
    assert moved(before) == parsers


async def test_upstream_fast_heads_switch(monkeypatch):
    monkeypatch.setattr(UpstreamConnection, "fast_heads", False)
    before = counts()
    async with ScriptedUpstream([[OK]]) as upstream:
        conn = await connect(upstream.port)
        assert await exchange(conn) == (200, UPSTREAM_BODY)
        conn.close()
    assert moved(before) == {"response_h11": 1}


def test_header_map_of_a_fast_parsed_head_is_the_latin1_map():
    data = (b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\nAccept: */*\r\nX-Two: 1\r\nx-two: 2\r\n"
            b"Content-Length: 0\r\n\r\n")
    event = parse_request(data, 65536)
    assert event is not None
    fast = Request("POST", "/v1/messages", event.headers, b"", "c", b"1.1", True)
    plain = Request("POST", "/v1/messages", event.headers, b"", "c", b"1.1")
    assert list(fast.header_map().items()) == list(plain.header_map().items())
    assert fast.header_map()["x-two"] == "1, 2"
    # A value with obs-text is never fast-parsed (h11 takes it): its bytes are decoded one for one.
    assert parse_request(data.replace(b"X-Api-Key: k", b"X-Api-Key: \xe9"), 65536) is None
    assert Request("GET", "/", [(b"x", b"\xe9")], b"", "c", b"1.1").header_map() == {"x": "\xe9"}
