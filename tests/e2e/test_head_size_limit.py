"""`max_header_bytes` bounds a request head however it arrives: the same bytes get the same answer whole in one read
or in two, with the fast head path on or off (it declines heads near the limit and h11's path decides). A head
padded with optional whitespace around its values is as large as its bytes: the server measures a head that came
whole as names and values only, so whitespace of any length passes where the same head in two reads is refused."""
from __future__ import annotations

import asyncio

import pytest

from tests.support.rawhttp import RawConnection

LIMIT = 1024
BOTH_PATHS = pytest.mark.parametrize("gateway", [{"max_header_bytes": LIMIT},
                                                 {"max_header_bytes": LIMIT, "fast_heads": False}],
                                     ids=["fast-heads", "h11-only"], indirect=True)


def padded_head(whitespace: int) -> bytes:
    return b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad:" + b" \t" * (whitespace // 2) + b"y\r\n\r\n"


async def status_of(gateway, pieces: list[bytes]) -> int:
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        for piece in pieces:
            await conn.send(piece)
            await asyncio.sleep(0.02)
        return (await conn.read_response(method="GET")).status


@BOTH_PATHS
@pytest.mark.parametrize("whitespace", [2 * LIMIT, 8 * LIMIT], ids=["twice-the-limit", "8-times-the-limit"])
async def test_whitespace_padded_head_over_the_limit_is_refused_whole_or_split(gateway, whitespace):
    head = padded_head(whitespace)
    assert len(head) > LIMIT
    split = await status_of(gateway, [head[:LIMIT + 10], head[LIMIT + 10:]])
    whole = await status_of(gateway, [head])
    assert (whole, split) == (431, 431)


@BOTH_PATHS
async def test_plain_head_under_the_limit_is_served_whole_or_split(gateway):
    head = padded_head(0).replace(b"x-pad:y", b"x-pad: " + b"v" * (LIMIT - 100))
    assert len(head) < LIMIT
    assert await status_of(gateway, [head]) == 200
    assert await status_of(gateway, [head[:len(head) // 2], head[len(head) // 2:]]) == 200
