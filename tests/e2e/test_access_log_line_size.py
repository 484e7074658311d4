"""Every access-log line is one write of at most 4 KiB (PIPE_BUF), whatever the client sent.

README: "a path over 512 characters is cut (it ends in `...`), so that every line is one write of at most 4 KiB,
which the lines of other workers sharing the pipe cannot split". A line longer than PIPE_BUF is written in one
write(2) that the kernel may interleave with another worker's, and a log shipper then reads two broken lines. The
path is cut, but the model name is the client's choice too: a request naming a 6,000-character model (refused
with 400, as no model id is that long) must still get a line within 4 KiB, in either format, that still parses.
"""
from __future__ import annotations

import json

import pytest

from apertis_proxy.observe.access_log import PIPE_BUF
from tests.support.rawhttp import RawConnection, request_bytes

ACCESS = "apertis_proxy.access"


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_a_long_model_name_keeps_the_line_within_one_pipe_write(gateway_env, mock_upstream, capsys, fmt):
    gateway_env.add_channel("main", mock_upstream)
    key = gateway_env.add_key("alice")
    gateway = await gateway_env.start(log_format=fmt)
    model = "claude-" + "x" * 6000
    async with await RawConnection.open(gateway.host, gateway.port) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"},
                                      json_body={"model": model, "max_tokens": 8,
                                                 "messages": [{"role": "user", "content": "hi"}]}))
        response = await conn.read_response()
    assert response.status == 400
    gateway.observe.access_log.flush()
    lines = [line for line in capsys.readouterr().err.splitlines() if ACCESS in line]
    [line] = [line for line in lines if response.header("request-id") in line]
    if fmt == "json":
        assert json.loads(line)["status"] == 400
    assert len(line.encode()) + 1 <= PIPE_BUF, f"an access-log line of {len(line.encode()) + 1} bytes"
