"""The listening side: a burst of connections is accepted at once, also on a busy loop, and running out of
descriptors pauses accepting instead of failing the server.

uvloop's own server accepts one connection per loop iteration, which on a loop busy with thousands of streams
left connections queued in the kernel for seconds (bench d-5000); these tests hold the loop busy while clients
connect, on both uvloop and asyncio's own loop, and count the iterations it takes to serve them all.
"""
from __future__ import annotations

import asyncio
import errno
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import uvloop

from apertis_proxy.listener import Listener, bind_sockets, ensure_port_free

# Under 128: kernels before 5.4 cap a listening socket's queue at 128 (net.core.somaxconn), and the burst waits in it.
BURST = 100


class Recorder(asyncio.Protocol):
    made: list["Recorder"]

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


def connect_burst(port: int, n: int, out: list[socket.socket]) -> None:
    for _ in range(n):
        out.append(socket.create_connection(("127.0.0.1", port), timeout=10))


def ping(sock: socket.socket) -> bytes:
    sock.sendall(b"ping")
    return sock.recv(16)


async def burst_while_busy(listener_factory) -> tuple[int, list[Recorder]]:
    """Clients connect while the loop is blocked; returns the loop iterations needed to see them all."""
    made: list[Recorder] = []
    proto = type("P", (Recorder,), {"made": made})
    port, close = await listener_factory(proto)
    clients: list[socket.socket] = []
    try:
        connector = threading.Thread(target=connect_burst, args=(port, BURST, clients))
        connector.start()
        connector.join()          # the kernel completed every handshake: all of them sit in the accept queue
        time.sleep(0.05)          # and the loop was busy meanwhile (it is this task)
        iterations = 0
        while len(made) < BURST and iterations < 10 * BURST:
            await asyncio.sleep(0)
            iterations += 1
        # They are served, not just accepted.
        assert await asyncio.get_running_loop().run_in_executor(None, ping, clients[-1]) == b"PING"
        return iterations, made
    finally:
        for c in clients:
            c.close()
        close()


def run_on(loop_kind: str, coro_fn):
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_burst_of_connections_is_accepted_in_one_wakeup(loop_kind):
    async def with_listener(proto):
        sockets = bind_sockets("127.0.0.1", 0)
        listener = Listener(sockets, proto, asyncio.get_running_loop())
        listener.start()
        return sockets[0].getsockname()[1], listener.close

    iterations, made = run_on(loop_kind, lambda: burst_while_busy(with_listener))
    assert len(made) == BURST
    # One wake-up accepts them all; each then needs its own step to start (connect_accepted_socket).
    assert iterations <= 5, iterations


def two_addresses(monkeypatch, families=(socket.AF_INET, socket.AF_INET)):
    """Make every name resolve to two addresses (127.0.0.1 and 127.0.0.2, or an IPv6 one first)."""
    addrs = {socket.AF_INET: ["127.0.0.1", "127.0.0.2"], socket.AF_INET6: ["::1"]}

    def fake(host, port, *a, **kw):
        out = []
        for fam in families:
            addr = addrs[fam].pop(0)
            out.append((fam, socket.SOCK_STREAM, 6, "", (addr, port) if fam == socket.AF_INET else (addr, port, 0, 0)))
        return out
    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_bind_sockets_gives_every_address_of_a_name_one_port(monkeypatch):
    two_addresses(monkeypatch)
    sockets = bind_sockets("twice.example", 0)
    try:
        assert [s.getsockname()[0] for s in sockets] == ["127.0.0.1", "127.0.0.2"]
        ports = {s.getsockname()[1] for s in sockets}
        assert len(ports) == 1 and 0 not in ports
        for s in sockets:
            assert s.getblocking() is False
            # Bound only: clients are refused until a Listener starts (the server is ready).
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
    finally:
        for s in sockets:
            s.close()


def test_bind_sockets_skips_a_family_the_kernel_lacks(monkeypatch):
    """IPv6 disabled (socket() fails with EAFNOSUPPORT): the IPv4 address is still served, as asyncio does."""
    two_addresses(monkeypatch, (socket.AF_INET6, socket.AF_INET))
    real = socket.socket

    def no_ipv6(family=socket.AF_INET, *a, **kw):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *a, **kw)
    monkeypatch.setattr(socket, "socket", no_ipv6)
    sockets = bind_sockets("dual.example", 0)
    try:
        assert [s.family for s in sockets] == [socket.AF_INET]
    finally:
        for s in sockets:
            s.close()


def test_a_port_in_use_is_named_in_the_error():
    first = bind_sockets("127.0.0.1", 0)
    first[0].listen()                               # another server, up and running on the port
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1 port {port}: Address already in use"):
            bind_sockets("127.0.0.1", port)
    finally:
        first[0].close()


class FakeListening:
    """A listening socket whose accept() fails as told, then has nothing more."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = 0

    def accept(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        raise BlockingIOError


def test_accept_errors_of_one_connection_are_skipped_and_others_pause(caplog):
    async def main():
        loop = asyncio.get_running_loop()
        sockets = bind_sockets("127.0.0.1", 0)
        listener = Listener(sockets, asyncio.Protocol, loop)
        listener.start()
        try:
            # A connection that failed before we took it (accept(2): treat like EAGAIN): skipped, no pause.
            fake = FakeListening([OSError(errno.EPROTO, "Protocol error"),
                                  ConnectionAbortedError(errno.ECONNABORTED, "")])
            listener._accept(fake)
            assert fake.calls == 3 and listener._retry is None
            # Anything else: logged once, accepting pauses instead of spinning on a readable socket.
            listener._accept(FakeListening([OSError(errno.EINVAL, "Invalid argument")]))
            assert listener._retry is not None
            assert "cannot accept connections (Invalid argument); pausing" in caplog.text
            # close() during the pause, and again: no restart, no error.
            listener.close()
            listener.close()
            assert listener._retry.cancelled()
            assert all(s.fileno() == -1 for s in sockets)
        finally:
            listener.close()
    asyncio.run(main())


def test_bind_sockets_with_reuse_port_lets_two_listeners_share_a_port():
    first = bind_sockets("127.0.0.1", 0, reuse_port=True)
    first[0].listen()
    try:
        port = first[0].getsockname()[1]
        second = bind_sockets("127.0.0.1", port, reuse_port=True)
        second[0].listen()                          # both listening: the kernel spreads connections over them
        second[0].close()
        with pytest.raises(OSError):
            bind_sockets("127.0.0.1", port)      # without it: address in use
    finally:
        first[0].close()


def test_a_port_shared_with_reuse_port_is_found_taken_by_the_probe():
    """ensure_port_free fails on a port other SO_REUSEPORT listeners hold (a second multi-worker server would
    otherwise join them), succeeds on a free one and leaves nothing bound: the workers bind after it."""
    first = bind_sockets("127.0.0.1", 0, reuse_port=True)
    first[0].listen()
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1 port {port}: Address already in use"):
            ensure_port_free("127.0.0.1", port)
    finally:
        first[0].close()
    ensure_port_free("127.0.0.1", port)
    workers = [bind_sockets("127.0.0.1", port, reuse_port=True)[0] for _ in range(2)]
    try:
        for sock in workers:
            sock.listen()
    finally:
        for sock in workers:
            sock.close()

def test_running_out_of_descriptors_pauses_accepting_and_recovers(tmp_path):
    """With RLIMIT_NOFILE nearly used up, accept() fails with EMFILE: the listener logs it, pauses, and accepts
    the waiting clients once descriptors are free again. The server process never fails."""
    script = tmp_path / "emfile.py"
    script.write_text(textwrap.dedent("""
        import asyncio, logging, os, resource, socket, sys, threading
        import uvloop
        from apertis_proxy import listener as L
        L.ACCEPT_RETRY_DELAY = 0.3
        logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(message)s")
        made = []

        class P(asyncio.Protocol):
            def connection_made(self, t):
                made.append(t)

        async def main():
            loop = asyncio.get_running_loop()
            socks = L.bind_sockets("127.0.0.1", 0)
            lst = L.Listener(socks, P, loop)
            lst.start()
            port = socks[0].getsockname()[1]
            # Clients from a child process: their descriptors do not count against our limit.
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c",
                "import socket, sys; sys.stdin.readline();"
                "cs = [socket.create_connection(('127.0.0.1', %d)) for _ in range(16)];"
                "print('connected', flush=True); sys.stdin.read()" % port,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            await asyncio.sleep(0.1)
            used = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (used + 3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            child.stdin.write(b"go\\n")
            await child.stdout.readline()
            for _ in range(100):
                await asyncio.sleep(0.01)
            stalled = len(made)
            for t in made:                  # free the descriptors again
                t.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            for _ in range(200):
                if len(made) == 16:
                    break
                await asyncio.sleep(0.01)
            print("stalled", stalled, "made", len(made), flush=True)
            child.stdin.close()
            await child.wait()
            lst.close()

        uvloop.run(main())
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cannot accept connections (Too many open files)" in res.stdout
    stalled = int(res.stdout.split("stalled ")[1].split()[0])
    assert 0 < stalled < 16
    assert "made 16" in res.stdout
