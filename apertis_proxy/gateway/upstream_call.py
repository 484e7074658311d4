"""One whole request to one channel and its whole answer, for the endpoints beside
Messages (batches, files): no streaming, no splicing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..plugin_api import Channel
from ..upstream.pool import Pools
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


async def call(pools: Pools, channel: Channel, method: str, target: str, client_headers: list[tuple[bytes, bytes]],
               body: bytes, *, read_timeout: float, api_version: str,
               connected: Optional[Callable[[], None]] = None) -> Answer:
    """`method target` on the channel, answered whole; UpstreamError when no answer came
    (or ValueError for a channel that cannot be reached as configured).  `connected()` is called
    once a connection is held, before the request goes out (see Lease.send)."""
    origin = pools.origin(channel.base_url)
    headers = upstream_headers(client_headers, channel, origin.host_header, api_version, len(body))
    with pools.pool(origin).lease() as lease:
        head = await lease.send(method.encode(), (origin.base_path + target).encode("latin-1"), headers, body,
                                read_timeout, connected)
        raw = await lease.conn.read_all(read_timeout, RESPONSE_LIMIT)
    return Answer(head.status, head.headers, raw)
