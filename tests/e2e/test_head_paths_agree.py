"""The same bytes, sent to a gateway with the fast head path and to one without it (h11 for every head, the oracle),
get the same answers: statuses, error types, `connection` headers, whether the connection is closed after, and the
requests the upstream sees. Pipelined requests (a second one in the read that ends the first's body, a second head
cut in two), `Connection` variants, HTTP/1.0, `Expect: 100-continue`, Host rules, Content-Length spellings, bytes
outside visible ASCII in a value, and heads at the size limit and one byte over it, whole or in two reads."""
from __future__ import annotations

import asyncio

import pytest

from tests.support.gateway_env import GatewayEnv
from tests.support.rawhttp import RawConnection
from tests.support.smuggling_vectors import BODY

LIMIT = 1024
HEALTH = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"


def post(key: str, *lines: bytes, version: bytes = b"1.1", body: bytes = BODY) -> bytes:
    return (b"POST /v1/messages HTTP/" + version + b"\r\nx-api-key: " + key.encode()
            + b"\r\ncontent-type: application/json\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body)


def sized_get(size: int, count: int) -> bytes:
    """A GET /health head of exactly `size` bytes with `count` headers (one of them the padding)."""
    start = b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-%d: y\r\n" % i for i in range(count - 2))
    pad = size - len(start) - len(b"x-pad: \r\n\r\n")
    head = start + b"x-pad: " + b"p" * pad + b"\r\n\r\n"
    assert len(head) == size
    return head


def cases(key: str) -> dict[str, list[bytes]]:
    length = b"content-length: %d" % len(BODY)
    host = b"host: 127.0.0.1"
    table = {
        "pipelined-after-body": [post(key, host, length) + HEALTH],
        "pipelined-head-cut": [post(key, host, length) + HEALTH[:9], HEALTH[9:]],
        "body-late-then-pipelined": [post(key, host, length, body=b""), BODY + HEALTH],
        "connection-close": [post(key, host, length, b"connection: close") + HEALTH],
        "connection-Close": [post(key, host, length, b"Connection: Close") + HEALTH],
        "connection-list": [post(key, host, length, b"connection: keep-alive, close") + HEALTH],
        "connection-two-lines": [post(key, host, length, b"connection: keep-alive", b"connection: close") + HEALTH],
        "connection-keep-alive": [post(key, host, length, b"connection: keep-alive") + HEALTH],
        "http10": [post(key, length, version=b"1.0") + HEALTH],
        "http10-keep-alive": [post(key, length, b"connection: keep-alive", version=b"1.0") + HEALTH],
        "http10-host": [post(key, host, length, version=b"1.0") + HEALTH],
        "expect-100": [post(key, host, length, b"expect: 100-continue", body=b""), BODY + HEALTH],
        "no-host": [post(key, length) + HEALTH],
        "two-hosts": [post(key, host, host, length) + HEALTH],
        "empty-host": [post(key, b"host:", length) + HEALTH],
        "length-upper-case": [post(key, host, b"CONTENT-LENGTH: %d" % len(BODY)) + HEALTH],
        "length-leading-zeros": [post(key, host, b"content-length: 000%d" % len(BODY)) + HEALTH],
        "length-19-digits": [post(key, host, b"content-length: %019d" % len(BODY)) + HEALTH],
        "length-21-digits": [post(key, host, b"content-length: %021d" % len(BODY)) + HEALTH],
        "length-plus": [post(key, host, b"content-length: +%d" % len(BODY)) + HEALTH],
        "length-minus": [post(key, host, b"content-length: -%d" % len(BODY)) + HEALTH],
        "length-spaced": [post(key, host, b"content-length: \t %d \t" % len(BODY)) + HEALTH],
        "length-huge": [post(key, host, b"content-length: 999999999999999999") + HEALTH],
        "value-nul": [post(key, host, length, b"x-note: a\x00b") + HEALTH],
        "value-del": [post(key, host, length, b"x-note: a\x7fb") + HEALTH],
        "value-obs-text": [post(key, host, length, b"x-note: caf\xc3\xa9") + HEALTH],
    }
    for size in (LIMIT - 40, LIMIT - 1, LIMIT, LIMIT + 1, LIMIT + 2, LIMIT + 40):
        for count in (3, 40):
            head = sized_get(size, count)
            table[f"head-{size}-{count}-whole"] = [head + HEALTH]
            table[f"head-{size}-{count}-split"] = [head[:size // 2], head[size // 2:] + HEALTH]
    return table


async def answers(port: int, pieces: list[bytes]) -> list:
    seen: list = []
    async with await RawConnection.open("127.0.0.1", port) as conn:
        for piece in pieces:
            await conn.send(piece)
            await asyncio.sleep(0.01)
        for _ in range(2):
            try:
                response = await conn.read_response(timeout=2)
            except asyncio.IncompleteReadError:
                seen.append("closed")
                break
            except asyncio.TimeoutError:
                seen.append("open")
                break
            kind = response.json()["error"]["type"] if response.status >= 400 else None
            seen.append((response.status, kind, response.header("connection")))
    return seen


@pytest.fixture
async def two_gateways(tmp_path, store_template, mock_upstream):
    envs = []
    for name, fast in (("fast", True), ("h11", False)):
        env = GatewayEnv(str(tmp_path / f"{name}.db"), store_template)
        env.key = env.add_key("alice")
        env.add_channel("main", mock_upstream)
        await env.start(fast_heads=fast, max_header_bytes=LIMIT)
        envs.append(env)
    yield envs
    for env in envs:
        await env.stop()
        env.close()


async def test_fast_and_h11_paths_answer_the_same_bytes_alike(two_gateways, mock_upstream):
    fast, oracle = two_gateways
    differences = {}
    for name, pieces in cases(fast.key).items():
        before = len(mock_upstream.requests)
        got = await answers(fast.gateway.port, pieces)
        upstream_fast = [r.raw_body for r in mock_upstream.requests[before:]]
        before = len(mock_upstream.requests)
        expected = await answers(oracle.gateway.port, [p.replace(fast.key.encode(), oracle.key.encode())
                                                       for p in pieces])
        upstream_h11 = [r.raw_body for r in mock_upstream.requests[before:]]
        if (got, upstream_fast) != (expected, upstream_h11):
            differences[name] = (got, expected, len(upstream_fast), len(upstream_h11))
    assert differences == {}
