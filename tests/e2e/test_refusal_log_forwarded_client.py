"""Behind a trusted proxy, a request the HTTP layer refuses after reading its head is logged with the client the
proxy names, like every other request.

README: only a request whose peer is in `[server] trusted_proxies` has its forwarded header read, and "the first
other address is the client, in the ledger, the access log and the `[metrics] allow` check". A refused request's
line has `null` only "for what could not be read"; a head that was read whole (a body over `max_body_bytes`, an
HTTP version other than 1.x, ambiguous framing) carries its X-Forwarded-For, so its line must name the client
203.0.113.5, not the proxy's own address and port (which is the same for every client behind nginx).
"""
from __future__ import annotations

import json

import pytest

from tests.support.rawhttp import RawConnection

ACCESS = "apertis_proxy.access"
CLIENT = "203.0.113.5"
FORWARDED = b"x-forwarded-for: " + CLIENT.encode() + b"\r\n"

# (status, request bytes): each head is whole, its X-Forwarded-For readable.
REFUSED_AFTER_THE_HEAD = [
    (413, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n" + FORWARDED + b"content-length: 5000\r\n\r\n"),
    (505, b"GET /health HTTP/2.0\r\nhost: x\r\n" + FORWARDED + b"\r\n"),
    (400, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n" + FORWARDED +
     b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize(("status", "data"), REFUSED_AFTER_THE_HEAD, ids=["body_too_large", "http_version",
                                                                          "framing"])
async def test_a_refusal_behind_a_trusted_proxy_is_logged_with_the_forwarded_client(gateway_env, capsys,
                                                                                      status, data):
    gateway = await gateway_env.start(log_format="json", max_body_bytes=1000, trusted_proxies=["127.0.0.1/32"])
    async with await RawConnection.open(gateway.host, gateway.port) as conn:     # as nginx on 127.0.0.1 sends it
        await conn.send(data)
        refused = await conn.read_response(method="GET")
    assert refused.status == status
    async with await RawConnection.open(gateway.host, gateway.port) as conn:     # the same client, served
        assert (await conn.request("GET", "/health", {"x-forwarded-for": CLIENT})).status == 200

    gateway.observe.access_log.flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    by_id = {line["request_id"]: line for line in lines if line["logger"] == ACCESS}
    served = [line for line in by_id.values() if line["path"] == "/health" and line["status"] == 200]
    assert [line["client"] for line in served] == [CLIENT]
    line = by_id[refused.header("request-id")]
    assert line["status"] == status
    assert line["client"] == CLIENT, f"refused {status} logged with client {line['client']!r}"
