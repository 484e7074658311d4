"""One whole request to one channel and its whole answer, for the endpoints beside
Messages (batches, files): no streaming, no splicing."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Optional

from ..plugin_api import Channel
from ..upstream.connection import ResponseHead, UpstreamConnection, UpstreamError
from ..upstream.pool import Pool, Pools
from .headers import upstream_headers

RESPONSE_LIMIT = 256 * 1024 * 1024     # batch results and file contents come whole


@dataclass(slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def get(self, name: bytes) -> Optional[bytes]:
        for k, v in self.headers:
            if k == name:
                return v
        return None


async def exchange(pool: Pool, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                   read_timeout: float, connected: Optional[Callable[[], None]] = None
                   ) -> tuple[UpstreamConnection, ResponseHead]:
    """Send a request on a pooled connection and read the answer's head.  A reused
    keep-alive connection the upstream closed meanwhile gets one fresh retry.
    UpstreamError when it fails (the connection is discarded); `connected()` is
    called once a connection is held."""
    for fresh in (False, True):
        conn, reused = await pool.acquire(fresh=fresh)
        if connected is not None:
            connected()
        try:
            conn.send_request(method, target, headers, body)
            return conn, await conn.read_head(read_timeout)
        except asyncio.CancelledError:
            pool.discard(conn)
            raise
        except UpstreamError as exc:
            pool.discard(conn)
            if not reused or exc.timeout or fresh:
                raise
    raise AssertionError("unreachable")


async def call(pools: Pools, channel: Channel, method: str, target: str, client_headers: list[tuple[bytes, bytes]],
               body: bytes, *, read_timeout: float, api_version: str) -> Answer:
    """`method target` on the channel, answered whole; UpstreamError when no answer came
    (or ValueError for a channel that cannot be reached as configured)."""
    origin = pools.origin(channel.base_url)
    headers = upstream_headers(client_headers, channel, origin.host_header, api_version, len(body))
    pool = pools.pool(origin)
    conn, head = await exchange(pool, method.encode(), (origin.base_path + target).encode("latin-1"), headers, body,
                                read_timeout)
    try:
        raw = await conn.read_all(read_timeout, RESPONSE_LIMIT)
    except BaseException:
        pool.discard(conn)
        raise
    pool.release(conn)
    return Answer(head.status, head.headers, raw)
