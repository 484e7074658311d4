"""How bytes move through a transport, for the server and the upstream connection alike."""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

# A piece shorter than this is joined with its framing into one buffer and
# written with one call (one copy of it); a longer one goes out uncopied with
# writelines().
SMALL_WRITE = 16 * 1024


class FlowControl:
    """Back-pressure on one transport: its reading paused and resumed, and the
    writers that wait while its write buffer is over the high-water mark (the
    protocol passes on asyncio's pause_writing and resume_writing)."""

    __slots__ = ("transport", "reading", "write_paused", "on_writable", "_drained")

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None     # set in connection_made
        self.reading = True
        self.write_paused = False
        # Called once, at the next resume_writing (a producer that cannot await).
        self.on_writable: Optional[Callable[[], None]] = None
        self._drained: Optional[asyncio.Future] = None

    def pause_reading(self) -> None:
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake_writers()
        callback, self.on_writable = self.on_writable, None
        if callback is not None:
            callback()

    async def drain(self) -> None:
        """Wait until the write buffer drained below its high-water mark, or
        `wake_writers()` (the connection was lost)."""
        if not self.write_paused:
            return
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
        await self._drained

    def wake_writers(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
