"""Listening sockets that take every pending connection when they become readable.

uvloop's own server (libuv >= 1.45) accepts one connection per readiness
event, which is once per event-loop iteration.  On a loop busy with thousands
of streams an iteration takes tens to hundreds of milliseconds, so a burst of
new clients waits in the kernel's accept queue for seconds (measured: 1,000
of 5,000 streams opened over 2 s waited ~10 s for their first byte).
asyncio's selector loop, nginx (`multi_accept`) and this module accept a batch
per wake-up instead; each socket is then handed to the loop with the public
`connect_accepted_socket`, so any event loop works.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Callable, Optional

log = logging.getLogger("apertis_proxy.listener")

BACKLOG = 4096
# Per wake-up; the rest waits one loop iteration so requests already read are
# not starved by a connection storm (asyncio's selector loop uses the backlog).
ACCEPT_BATCH = 512
# Out of descriptors or memory, or an error nobody expects: stop accepting for
# a while rather than spin on a socket that stays readable (asyncio waits 1 s).
ACCEPT_RETRY_DELAY = 1.0
# asyncio's own bound on a TLS handshake, used when the server gives none.
HANDSHAKE_TIMEOUT = 60.0
# At most one warning this often about connections refused during their TLS handshake.
_REFUSED_LOG_INTERVAL = 10.0
# accept(2) on Linux passes on pending network errors of the new connection;
# its manual says to treat them like EAGAIN and retry.  Netfilter adds EPERM.
_TRANSIENT = frozenset(getattr(errno, name) for name in (
    "ENETDOWN", "EPROTO", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP",
    "ENETUNREACH", "EPERM", "ECONNABORTED") if hasattr(errno, name))


def bind_sockets(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, non-blocking sockets for every address `host` resolves to; the
    Listener makes them listen.  Binding early claims the port (a port in use
    fails here) while clients are still refused until the server is ready.

    An address family the kernel does not support (IPv6 disabled) is skipped,
    as asyncio does; it is an error only if nothing could be bound."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:      # a name that does not resolve: said like a port in use
        raise OSError(exc.errno, f"cannot listen on {host} port {port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            if port == 0 and sockets:
                # One port for every address of "localhost": the first one bound picks it.
                addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Otherwise "::" would also take the IPv4 port bound next to it.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {addr[0]} port {addr[1]}: {exc.strerror}") from None
            sock.setblocking(False)
        if not sockets:
            raise OSError(errno.EAFNOSUPPORT, f"no address of {host!r} can be bound here")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def ensure_port_free(host: str, port: int) -> None:
    """Fail as `bind_sockets` does ("cannot listen on HOST port PORT: Address already in use") if
    anything listens on `port` already, including another server's SO_REUSEPORT workers: a probe
    socket without SO_REUSEPORT cannot join them.  The probe is closed before returning, so the
    workers bind next (each with SO_REUSEPORT).  Port 0 (any free port) has nothing to probe."""
    if port == 0:
        return
    for sock in bind_sockets(host, port):
        sock.close()


class Listener:
    """Listens on bound `sockets`, accepts, and runs `factory()`'s protocol on each connection.

    With TLS a connection reaches its protocol only once its handshake is done, so the
    server's connection cap cannot see it before: `may_handshake(n)`, given the handshakes
    already under way, says whether a new one may start (a connection it refuses is closed
    at once), and a handshake gets `handshake_timeout` seconds."""

    def __init__(self, sockets: list[socket.socket], factory: Callable[[], asyncio.Protocol],
                 loop: asyncio.AbstractEventLoop, *, backlog: int = BACKLOG,
                 tls: Optional[Callable[[], ssl.SSLContext]] = None,
                 may_handshake: Optional[Callable[[int], bool]] = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.sockets = sockets
        self._tls = tls         # the current SSL context, asked for each connection (see tls.py)
        self._may_handshake = may_handshake
        self._handshake_timeout = handshake_timeout
        self.handshakes = 0     # TLS handshakes under way
        self._refused_logged_at = -_REFUSED_LOG_INTERVAL
        self._refused_since_log = 0
        self._backlog = backlog
        self._listening = False
        self._factory = factory
        self._loop = loop
        self._closed = False
        self._retry: Optional[asyncio.TimerHandle] = None

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("the listener is closed")
        for sock in self.sockets:
            if not self._listening:
                sock.setblocking(False)
                sock.listen(self._backlog)
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        self._listening = True

    def close(self) -> None:
        """Stop accepting and close the sockets; accepted connections live on.
        Connections still in the kernel's queue are reset.  Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, sock: socket.socket) -> None:
        loop = self._loop
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue        # that connection failed; the next may not
                log.error("cannot accept connections (%s); pausing for %.1f s",
                          exc.strerror or exc, ACCEPT_RETRY_DELAY)
                self._pause(ACCEPT_RETRY_DELAY)
                return
            if self._tls is not None:
                # A handshake counts from its accept(): the tasks of one batch start after it.
                if self._may_handshake is not None and not self._may_handshake(self.handshakes):
                    conn.close()
                    self._refused_handshake()
                    continue
                self.handshakes += 1
            conn.setblocking(False)
            loop.create_task(self._connect(conn))

    def _refused_handshake(self) -> None:
        self._refused_since_log += 1
        now = self._loop.time()
        if now - self._refused_logged_at >= _REFUSED_LOG_INTERVAL:
            log.warning("connection cap reached: closed %d new connections before their TLS handshake "
                        "(handshakes under way: %d)", self._refused_since_log, self.handshakes)
            self._refused_logged_at = now
            self._refused_since_log = 0

    async def _connect(self, conn: socket.socket) -> None:
        try:
            if self._closed:
                conn.close()        # shutdown began since accept(): as if still queued
                return
            await self._serve(conn, None if self._tls is None else self._tls())
        finally:
            if self._tls is not None:
                self.handshakes -= 1    # counted in _accept()

    async def _serve(self, conn: socket.socket, context: Optional[ssl.SSLContext] = None) -> None:
        try:
            if context is None:
                await self._loop.connect_accepted_socket(self._factory, conn)
            else:
                await self._loop.connect_accepted_socket(self._factory, conn, ssl=context,
                                                         ssl_handshake_timeout=self._handshake_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            # A client that failed the TLS handshake (plain HTTP, an untrusted
            # certificate) or left during it: its problem, not the server's.
            log.debug("TLS handshake with a new connection failed: %s", exc)
            conn.close()
        except Exception:  # noqa: BLE001 - one connection's failure must not go unlogged
            log.exception("could not start serving an accepted connection")
            conn.close()

    def _pause(self, delay: float) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())

        def resume() -> None:
            self._retry = None
            if not self._closed:
                self.start()
        self._retry = self._loop.call_later(delay, resume)
