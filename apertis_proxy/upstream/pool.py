"""Keep-alive connection pools, one per upstream origin (scheme, host, port)."""
from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Callable, Optional
from urllib.parse import urlsplit

from .connection import ResponseHead, UpstreamConnection, UpstreamError


class Origin:
    __slots__ = ("scheme", "host", "port", "base_path", "host_header", "key")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported channel base URL: {base_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        default = (self.scheme == "https" and self.port == 443) or (self.scheme == "http" and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default else f"{host}:{self.port}").encode("ascii")
        self.key = (self.scheme, self.host, self.port)


class Lease:
    """One pool slot held for one request and its response, as `with
    pool.lease() as lease`.  The connection in it goes back to the pool on
    every way out of the block: kept for reuse when its exchange finished
    cleanly, closed otherwise (and always when the block raised).  Whoever
    holds a lease never returns a connection by hand.  (A plain context
    manager: giving a connection back never waits.)"""

    __slots__ = ("_pool", "conn", "reused", "resent")

    def __init__(self, pool: "Pool") -> None:
        self._pool = pool
        self.conn: Optional[UpstreamConnection] = None
        self.reused = False         # `conn` came from the idle set
        # The failure of a first send on a reused connection, after which the request went again on a fresh
        # one: the upstream may have read it (and may bill it) before the connection closed.
        self.resent: Optional[UpstreamError] = None

    async def send(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                   read_timeout: float, connected: Optional[Callable[[], None]] = None) -> ResponseHead:
        """Send a request on a connection taken into the lease and read the
        answer's head; the body is then read from `conn`.  A reused keep-alive
        connection the upstream closed meanwhile gets one fresh retry.  Raises
        UpstreamError when it fails; `connected()` is called once a connection
        is held."""
        pool = self._pool
        for fresh in (False, True):
            if self.conn is not None:
                self.drop()             # the stale connection of a retry
            conn, self.reused = await pool.acquire(fresh)
            self.conn = conn
            if connected is not None:
                connected()
            try:
                conn.send_request(method, target, headers, body)
                return await conn.read_head(read_timeout)
            except UpstreamError as exc:
                if not self.reused or exc.timeout or fresh:
                    raise
                if exc.phase != "send":         # closed before the request was sent: nothing went out
                    self.resent = exc
        raise AssertionError("unreachable")

    def drop(self) -> None:
        """Close the connection held, if any, and free its slot."""
        conn, self.conn = self.conn, None
        if conn is not None:
            self._pool.discard(conn)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if exc_type is None:
            self._pool.release(conn)
        else:
            self._pool.discard(conn)


class Pool:
    """Idle connections to one origin.  Bookkeeping first, I/O after.
    Connections are taken with `lease()`."""

    def __init__(self, origin: Origin, *, max_idle: int, idle_timeout: float, connect_timeout: float,
                 ssl_context: Optional[ssl.SSLContext]) -> None:
        self.origin = origin
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._ssl = ssl_context
        self.opened = 0          # connections ever opened (tests and stats)
        self.in_use = 0
        # get_running_loop() costs a getpid() syscall; the loop never changes.
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def lease(self) -> Lease:
        return Lease(self)

    async def acquire(self, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """A connection ready for one request, and whether it was reused."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and not fresh:
            conn = self._idle.pop()          # most recently used first: warmest
            if conn.closed or now - conn.idle_since > self._idle_timeout:
                conn.close()
                continue
            self.in_use += 1
            return conn, True
        conn = await self._connect(loop)
        self.in_use += 1
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
        """Take a connection back: idle for reuse when its exchange finished
        cleanly (`conn.recycle()`), closed otherwise."""
        self.in_use -= 1
        idle = self._idle
        if len(idle) < self._max_idle and conn.recycle():
            conn.idle_since = now = conn.loop_time()
            idle.append(conn)
            # Trim the cold end, one per release: connections idle past the
            # timeout, or closed by the upstream meanwhile, do not pile up.
            oldest = idle[0]
            if oldest.closed or now - oldest.idle_since > self._idle_timeout:
                idle.popleft().close()
        else:
            conn.close()

    def discard(self, conn: UpstreamConnection) -> None:
        """Drop a connection whose exchange did not finish (client left, error)."""
        self.in_use -= 1
        conn.close()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
        o = self.origin
        try:
            # asyncio.timeout, not wait_for: wait_for runs the connect in a task
            # of its own (a task and two more loop callbacks per connection).
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(UpstreamConnection, o.host, o.port, ssl=self._ssl,
                                                       server_hostname=o.host if self._ssl else None)
        except asyncio.TimeoutError:
            raise UpstreamError(f"connect to {o.host}:{o.port} timed out", "connect", timeout=True) from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {o.host}:{o.port}: {exc.strerror or exc}", "connect") from None
        self.opened += 1
        return conn

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    @property
    def idle(self) -> int:
        return len(self._idle)


class Pools:
    """All pools of one worker, created on first use per origin."""

    def __init__(self, *, max_idle: int = 1024, idle_timeout: float = 60.0,
                 connect_timeout: float = 10.0) -> None:
        self._pools: dict[tuple, Pool] = {}
        self._origins: dict[str, Origin] = {}
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._ssl: Optional[ssl.SSLContext] = None

    def origin(self, base_url: str) -> Origin:
        o = self._origins.get(base_url)
        if o is None:
            o = self._origins[base_url] = Origin(base_url)
        return o

    def pool(self, origin: Origin) -> Pool:
        p = self._pools.get(origin.key)
        if p is None:
            if origin.scheme == "https" and self._ssl is None:
                # System CA store; SNI comes from server_hostname.
                self._ssl = ssl.create_default_context()
            p = self._pools[origin.key] = Pool(
                origin, max_idle=self._max_idle, idle_timeout=self._idle_timeout,
                connect_timeout=self._connect_timeout,
                ssl_context=self._ssl if origin.scheme == "https" else None)
        return p

    def close(self) -> None:
        for p in self._pools.values():
            p.close()
