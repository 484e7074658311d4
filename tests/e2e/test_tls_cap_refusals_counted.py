"""Connections a TLS listener closes at the connection cap show in the metrics.

README: `apertis_http_refusals_total{reason="connection_cap"}` counts connections refused while every connection
is busy, and each gets an access-log line. Without TLS the refused connection is answered 503 and counted. With
TLS, "one past the cap is closed at once" (before its handshake, so no 503 can be sent): the server then refused
seven of ten clients, yet no counter moves (only a warning line, at most one every few seconds), so an operator of a
TLS deployment cannot see, alert on or rate the refusals at all. Judgement call: the metric is documented as
"requests answered with an error", and these connections got no answer.
"""
from __future__ import annotations

import asyncio
import socket
import ssl

from tests.e2e.test_tls_handshake_burst import closed_by_peer
from tests.ops.test_deploy import install_cert, needs_openssl, pki  # noqa: F401 (a fixture)
from tests.support.metrics import parse, total


async def scrape_tls(port: int, cafile: str) -> str:
    context = ssl.create_default_context(cafile=cafile)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    writer.write(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"transfer-encoding: chunked" in head.lower():
        pieces, rest = [], body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            pieces.append(rest[:size])
            rest = rest[size + 2:]
        body = b"".join(pieces)
    return body.decode()


@needs_openssl
async def test_tls_connections_closed_at_the_cap_are_counted(gateway_env, pki, tmp_path):  # noqa: F811
    cert, key_file = install_cert(pki, tmp_path, "a")
    gw = await gateway_env.start(tls_cert=cert, tls_key=key_file, max_connections=3, header_timeout=30.0)
    burst = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(10)]
    try:
        await asyncio.sleep(0.5)
        assert sum(closed_by_peer(s) for s in burst) == 7
    finally:
        for s in burst:
            s.close()

    async def room() -> None:
        while gw._listener.handshakes or gw.state.connections:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(room(), 10)
    samples = parse(await scrape_tls(gw.port, str(pki / "ca.pem")))
    refused = total(samples, "apertis_http_refusals_total", reason="connection_cap")
    assert refused == 7, f"7 connections closed at the cap; apertis_http_refusals_total counts {refused:g}"
