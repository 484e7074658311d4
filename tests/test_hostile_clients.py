"""Clients that try to make the gateway spend memory, CPU or descriptors for nothing: uploads without a valid key
(refused from the head, before the body is read) and connections past the cap (idle keep-alive connections are shed
first). Real sockets on 127.0.0.1 against an in-process gateway; each test runs in about a second."""
from __future__ import annotations

import asyncio

import pytest

from rawhttp import RawConnection, request_bytes
from test_gateway_http import assert_gateway_error

BIG = 30 * 1024 * 1024
# A read timeout far below the body timeout: an answer must come from the head, not after the body.
ANSWER_WITHIN = 5.0


async def connect(env) -> RawConnection:
    return await RawConnection.open(env.gateway.host, env.gateway.port)


@pytest.mark.parametrize("credential", [{}, {"x-api-key": "sk-apx-not-a-key"},
                                        {"authorization": "Bearer sk-apx-not-a-key"}],
                         ids=["no-key", "unknown-key", "unknown-bearer"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_read(gateway, credential, framing):
    """The head announces 30 MB and the first 64 KB follow: the 401 comes at once, the connection closes, and the
    body is never buffered or parsed (it used to be read whole, then parsed, then refused)."""
    headers = {**credential, "content-type": "application/json"}
    if framing == "chunked":
        headers["transfer-encoding"] = "chunked"
    else:
        headers["content-length"] = str(BIG)
    async with await connect(gateway) as conn:
        head = request_bytes("POST", "/v1/messages", headers, content_length=False)
        piece = b"x" * 65536
        await conn.send(head + (b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece))
        response = await conn.read_response(timeout=ANSWER_WITHIN)
        assert_gateway_error(response, 401, "authentication_error")
        assert response.header("connection") == "close"
        assert await conn.wait_closed_by_peer(timeout=ANSWER_WITHIN)
    assert gateway.mock.requests == []
    rows = gateway.query("SELECT COUNT(*) FROM usage")
    assert rows[0][0] == 0


async def test_a_valid_key_still_sends_its_body_in_pieces(gateway):
    """The head check admits a known key: a body that arrives in several pieces is read and served."""
    body = request_bytes("POST", "/v1/messages", {"x-api-key": gateway.key},
                         json_body={"model": "claude-haiku-4-5-20251001", "max_tokens": 16,
                                    "messages": [{"role": "user", "content": "in pieces " + "y" * 100_000}]})
    async with await connect(gateway) as conn:
        cut = body.index(b"\r\n\r\n") + 10
        await conn.send(body[:cut])
        await asyncio.sleep(0.05)
        await conn.send(body[cut:])
        response = await conn.read_response()
        assert response.status == 200 and "in pieces" in response.json()["content"][0]["text"]
    assert len(gateway.mock.requests) == 1


async def test_a_disabled_key_is_refused_from_the_head_with_its_reason(gateway_env, mock_upstream):
    key = gateway_env.add_key("bob")
    gateway_env.add_channel("main", mock_upstream)
    gateway_env.conn.execute("UPDATE keys SET enabled = 0 WHERE name = 'bob'")
    gateway_env.conn.commit()
    await gateway_env.start()
    async with await connect(gateway_env) as conn:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": key, "content-length": str(BIG)},
                                      content_length=False) + b"{" * 1000)
        response = await conn.read_response(timeout=ANSWER_WITHIN)
        assert_gateway_error(response, 401, "authentication_error", "disabled")
    assert mock_upstream.requests == []
