"""GET /ready: 200 while the store answers, a channel is enabled and the server is not draining; 503 with the
reason otherwise. At SIGTERM it turns 503 at once, while a stream is still finishing and, for `drain_delay`
seconds, while the port still accepts; `/health` stays 200 all along (liveness).
"""
from __future__ import annotations

import os
import signal

from apertis_proxy.store import channels
from tests.support.metrics import scrape_samples, value
from tests.support.rawhttp import RawConnection
from tests.support.processes import connect_refused, wait_for
from tests.support.served_gateway import DRAIN_TIMEOUT, StreamWatcher, configured_server


async def probe(host: str, port: int, path: str = "/ready") -> tuple[int, dict]:
    async with await RawConnection.open(host, port) as conn:
        response = await conn.request("GET", path)
    return response.status, response.json()


async def test_ready_follows_the_store_and_the_channels(gateway):
    host, port = gateway.gateway.host, gateway.gateway.port
    assert await probe(host, port) == (200, {"status": "ready"})

    channels.set_channel_enabled(gateway.conn, "main", False)
    status, body = await probe(host, port)
    assert (status, body) == (503, {"status": "unavailable", "reason": "no channel is enabled"})
    assert (await probe(host, port, "/health"))[0] == 200        # alive all the same

    channels.set_channel_enabled(gateway.conn, "main", True)
    assert (await probe(host, port))[0] == 200

    moved = gateway.db_path + ".elsewhere"
    os.rename(gateway.db_path, moved)                           # the store is gone
    try:
        status, body = await probe(host, port)
        assert status == 503 and body["reason"].startswith("store unreachable: ")
    finally:
        os.rename(moved, gateway.db_path)
    assert (await probe(host, port))[0] == 200

    async with await RawConnection.open(host, port) as conn:
        response = await conn.request("POST", "/ready")
    assert response.status == 405 and response.json()["error"]["type"] == "invalid_request_error"


async def test_while_the_store_is_gone_the_channels_stay_in_the_metrics_as_the_gateway_routes_by_them(gateway):
    """The gateway goes on routing by the channels it last read while the store does not answer (/ready says why
    it is not ready): apertis_channel_up keeps reporting them, so a dashboard or an alert on it neither loses the
    series nor reads the channels as gone; a channel disabled before the outage stays 0."""
    host, port = gateway.gateway.host, gateway.gateway.port
    base = gateway.gateway.base_url
    channels.add_channel(gateway.conn, "spare", "http://127.0.0.1:9", "sk-spare")
    channels.set_channel_enabled(gateway.conn, "spare", False)
    before = await scrape_samples(base)
    assert (value(before, "apertis_channel_up", channel="main"), value(before, "apertis_channel_up", channel="spare")) \
        == (1, 0) and ("apertis_channel_up", frozenset({("channel", "spare")})) in before
    moved = gateway.db_path + ".elsewhere"
    os.rename(gateway.db_path, moved)
    try:
        assert (await probe(host, port))[0] == 503
        during = await scrape_samples(base)
    finally:
        os.rename(moved, gateway.db_path)
    assert value(during, "apertis_channel_up", channel="main") == 1
    assert ("apertis_channel_up", frozenset({("channel", "spare")})) in during
    assert value(during, "apertis_channel_up", channel="spare") == 0


async def test_ready_turns_503_at_sigterm_while_a_stream_is_finishing(tmp_path, mock_upstream):
    server, _, key = configured_server(tmp_path, mock_upstream.base_url, "[server]\ndrain_delay = 1.5\n")
    async with server:
        assert await probe("127.0.0.1", server.port) == (200, {"status": "ready"})
        stream = StreamWatcher(server.base_url, key, "event-delay=0.15")
        await stream.started()
        server.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            status, body = await probe("127.0.0.1", server.port)
            return status == 503 and body == {"status": "unavailable",
                                              "reason": "draining: the server is shutting down"}
        await wait_for(draining, DRAIN_TIMEOUT, "/ready to say 503")
        assert not stream.task.done()                           # the stream is still running
        assert (await probe("127.0.0.1", server.port, "/health"))[0] == 200

        async def refused() -> bool:
            return connect_refused(server.port)
        await wait_for(refused, DRAIN_TIMEOUT, "the port to close after drain_delay")
        await stream.finished()
        assert stream.error is None and stream.events[-1] == "message_stop"
        assert await server.wait() == 0
