"""A request cut by shutdown's deadline before anything was answered is observed with the status the ledger has.

At SIGTERM, in-flight requests get `shutdown_timeout`; past it their handlers are cancelled and the connection is
closed: the client gets no answer at all. The ledger records that row with status 0 and error_type
`gateway_stopped`. The access log's fields are the ledger's (README: "under the ledger's column names"), so the
line of that request id must carry the same status, and `apertis_requests_total` must not count it as a `500`
the gateway never sent: every rolling restart that cuts a slow request would otherwise show in logs and 5xx
alerts as a server error answered to a client.
"""
from __future__ import annotations

import asyncio
import json

from apertis_proxy.observe import exposition
from tests.support.metrics import parse, total
from tests.support.processes import MODEL
from tests.support.rawhttp import RawConnection, request_bytes

ACCESS = "apertis_proxy.access"


async def test_a_request_cut_at_the_shutdown_deadline_is_not_logged_as_a_500(gateway_env, mock_upstream, capsys):
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice")
    gateway = await gateway_env.start(log_format="json")
    conn = await RawConnection.open(gateway.host, gateway.port)
    await conn.send(request_bytes(
        "POST", "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01",
                                 "x-mock-scenario": "first-byte-delay=5"},
        json_body={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "slow"}]}))
    async def upstream_has_it() -> None:
        while not mock_upstream.requests:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(upstream_has_it(), 5)
    await gateway.shutdown(timeout=0.2)                 # the deadline passes before the upstream answers
    gateway_env.gateway = None
    assert await conn.read_until_eof() == b""           # the client got nothing: no status at all
    conn.close()

    [row] = gateway_env.query("SELECT request_id, status, error_type FROM usage")
    assert (row["status"], row["error_type"]) == (0, "gateway_stopped")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    [line] = [line for line in lines if line["logger"] == ACCESS and line["request_id"] == row["request_id"]]
    assert line["error_type"] == "gateway_stopped"

    page, _ = exposition.render([(await gateway.observe.snapshot(), True)], "")    # what /metrics last showed
    served_500 = total(parse(page.decode()), "apertis_requests_total", endpoint="/v1/messages", code="500")
    assert (line["status"], served_500) == (row["status"], 0), (
        f"access log status {line['status']}, apertis_requests_total code=500: {served_500:g}; "
        f"ledger status {row['status']}")
