"""The TLS handshake cap (listener.py, server.py may_handshake) under a burst of connections."""
from __future__ import annotations

import asyncio
import socket

from tests.ops.test_deploy import install_cert, needs_openssl, pki  # noqa: F401 (a fixture)


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the server has closed `sock` (reset, or end of stream with nothing sent)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@needs_openssl
async def test_a_burst_of_tls_connections_stays_under_the_connection_cap(gateway_env, pki, tmp_path):  # noqa: F811
    """A burst of ten connections that waited in the kernel's queue, at max_connections = 3: a handshake counts
    from its accept(), so three are taken and the other seven are closed at once (not ten handshakes and ten
    descriptors held until header_timeout)."""
    cert, key_file = install_cert(pki, tmp_path, "a")
    gw = await gateway_env.start(tls_cert=cert, tls_key=key_file, max_connections=3, header_timeout=30.0)
    # Blocking connects, without yielding to the loop: the kernel completes each and queues it for accept().
    burst = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(10)]
    try:
        await asyncio.sleep(0.5)                     # one accept callback takes the queue; the tasks start
        assert sum(closed_by_peer(s) for s in burst) == 7
    finally:
        for s in burst:
            s.close()
