"""An asyncio server on 127.0.0.1, on a port of its own, for `async with`: the lifecycle the tests' scripted
upstreams share; each answers its connections in `_serve`."""
from __future__ import annotations

import asyncio
from typing import Any, Optional


class LocalServer:
    server: Optional[asyncio.AbstractServer] = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        self._closing()
        await self.server.wait_closed()

    def _closing(self) -> None:
        """Between closing the listening socket and waiting for it: what else a server closes."""

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
