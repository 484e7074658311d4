"""An upstream for `UpstreamConnection` on a real socket: `ScriptedUpstream` answers each request on a connection
with the next script (a list of byte strings, each written separately, so each arrives in its own read). Where
scripted_channel.py stands behind a whole gateway, this one faces the connection alone: `connect(port)` opens an
UpstreamConnection to it and `exchange(conn)` sends one request and reads the answer's status and body. `OK` is a
plain 200 answer carrying `BODY`.

    async with ScriptedUpstream([[OK], [b"HTTP/1.1 100 Continue\\r\\n\\r\\n", OK]]) as upstream:
        conn = await connect(upstream.port)
        assert await exchange(conn) == (200, BODY)
"""
from __future__ import annotations

import asyncio

from apertis_proxy.upstream.connection import UpstreamConnection
from tests.support.local_server import LocalServer

BODY = b'{"type":"message","usage":{"input_tokens":3,"output_tokens":5}}'
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
REQUEST_HEADERS = [(b"host", b"upstream"), (b"content-length", b"2")]


class ScriptedUpstream(LocalServer):
    """Answers each request on a connection with the next script: a list of
    byte strings, each written separately (so each arrives in its own read)."""

    def __init__(self, scripts: list[list[bytes]]) -> None:
        self.scripts = scripts
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for script in self.scripts:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                for piece in script:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def connect(port: int) -> UpstreamConnection:
    _, conn = await asyncio.get_running_loop().create_connection(UpstreamConnection, "127.0.0.1", port)
    return conn


async def exchange(conn: UpstreamConnection) -> tuple[int, bytes]:
    conn.send_request(b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
    head = await conn.read_head(5.0)
    return head.status, await conn.read_all(5.0, 1 << 20)
