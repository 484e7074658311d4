"""What crosses to the upstream and back besides the body: a client's cookies and forwarding headers stay at the
gateway, and an upstream request id is passed on and recorded with the channel's key redacted."""
from __future__ import annotations

import json

import pytest

from tests.support.gateway_requests import message
from tests.support.gateway_requests import post_tagged as post
from tests.support.rawhttp import RawConnection
from tests.support.scripted_channel import HEAD_SSE, MESSAGE_STOP, ScriptedChannel, chunk, message_start

CHANNEL_KEY = "sk-ant-api03-" + "Zq7xK2mP9vL4nR8tW1yB3cD5f"


def received(mock, tag: str):
    found = [r for r in mock.requests if r.headers.get("x-test-seq") == tag]
    return found[-1] if found else None


async def test_cookies_and_forwarding_headers_stay_at_the_gateway(gateway_env, mock_upstream):
    """A Cookie is the client's credential for whatever stands in front of the gateway (an SSO proxy's
    session); the forwarding headers name the organisation's clients.  Upstream gets neither."""
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start()
    sent_along = {"cookie": "_oauth2_proxy=SESSION-SECRET-1234", "x-forwarded-for": "10.1.2.3",
                  "forwarded": "for=10.1.2.3", "x-real-ip": "10.1.2.3", "x-forwarded-host": "intranet.example",
                  "x-forwarded-proto": "https"}
    response, tag = await post(gateway_env, key, message(), sent_along)
    assert response.status == 200, response.body
    upstream = received(mock_upstream, tag).headers
    assert {name: upstream[name] for name in sent_along if name in upstream} == {}
    assert upstream.get("x-api-key") != key                 # and the client's key never (the channel's goes)


def scripted_answer(status: bytes, request_id: bytes, body: bytes, stream: bool) -> list[bytes]:
    if stream:
        events = [message_start(), MESSAGE_STOP]
        return [HEAD_SSE.replace(b"request-id: req_scripted", b"request-id: " + request_id),
                *(chunk(e) for e in events), b"0\r\n\r\n"]
    return [b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nrequest-id: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (status, request_id, len(body), body)]


@pytest.mark.parametrize("kind", ["error", "stream"])
async def test_an_upstream_request_id_holding_the_channel_key_is_passed_on_redacted(gateway_env, kind):
    """A relay that echoes the credential it was sent in its `request-id` header: the client's
    `upstream-request-id` and the ledger's upstream_request_id have it redacted, on an error answer and on a
    2xx stream alike."""
    async with ScriptedChannel() as channel:
        key = gateway_env.add_key("alice")
        gateway_env.add_channel("main", channel.base_url, api_key=CHANNEL_KEY)
        body = json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": f"bad request for {CHANNEL_KEY}"}}).encode()
        channel.queue(scripted_answer(b"400 Bad Request", b"req_1 " + CHANNEL_KEY.encode(), body, kind == "stream"))
        await gateway_env.start()
        async with await RawConnection.open(gateway_env.gateway.host, gateway_env.gateway.port) as conn:
            response = await conn.request("POST", "/v1/messages", {"x-api-key": key},
                                          json_body=message(stream=kind == "stream"))
        assert response.status == (200 if kind == "stream" else 400)
        [row] = await gateway_env.usage_rows(1)
    passed_on = response.header("upstream-request-id")
    assert passed_on is not None and passed_on.startswith("req_1 ") and CHANNEL_KEY not in passed_on
    assert row["upstream_request_id"] == passed_on
    assert CHANNEL_KEY.encode() not in response.body
