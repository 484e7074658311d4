"""The retry advice of an upstream error answer (`retry-after`, `retry-after-ms`, `x-should-retry`) and its request id
reach the client on every endpoint the gateway forwards, as they do for Messages: the official SDKs read these
headers to decide whether and when to retry."""
from __future__ import annotations

import json

import pytest

from tests.support.rawhttp import RawConnection
from tests.support.scripted_gateway import ask

HAIKU = "claude-haiku-4-5-20251001"
ADVICE = {"retry-after": "7", "retry-after-ms": "7000", "x-should-retry": "false"}


def error_answer(status: int, error_type: str) -> bytes:
    raw = json.dumps({"type": "error", "error": {"type": error_type, "message": "slow down"},
                      "request_id": "req_scripted"}).encode()
    extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in ADVICE.items())
    return (b"HTTP/1.1 %d Error\r\ncontent-type: application/json\r\nrequest-id: req_scripted\r\n%s"
            b"content-length: %d\r\n\r\n%s" % (status, extra, len(raw), raw))


BOUNDARY = "apertisboundary"
UPLOAD = (f"--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
          f"content-type: text/plain\r\n\r\nhello\r\n--{BOUNDARY}--\r\n").encode()

CASES = {
    "messages": ("/v1/messages", "application/json", json.dumps(ask(stream=False)).encode()),
    "batch-create": ("/v1/messages/batches", "application/json", json.dumps({"requests": [{
        "custom_id": "one", "params": {"model": HAIKU, "max_tokens": 64,
                                       "messages": [{"role": "user", "content": "hi"}]}}]}).encode()),
    "file-upload": ("/v1/files", f"multipart/form-data; boundary={BOUNDARY}", UPLOAD),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("status, error_type", [(429, "rate_limit_error"), (529, "overloaded_error")])
async def test_an_upstream_errors_retry_advice_reaches_the_client(scripted, case, status, error_type):
    await scripted.start()
    scripted.channel.queue([error_answer(status, error_type)])
    path, ctype, body = CASES[case]
    async with await RawConnection.open(scripted.gateway.host, scripted.gateway.port) as conn:
        response = await conn.request("POST", path, {"x-api-key": scripted.key, "content-type": ctype,
                                                     "anthropic-beta": "files-api-2025-04-14"}, body)
    assert len(scripted.channel.requests) == 1       # it reached the channel, and was answered with the error
    assert response.status == status, response.body
    assert response.json()["error"]["type"] == error_type
    got = {name: response.header(name) for name in ADVICE}
    assert got == ADVICE
    assert response.header("upstream-request-id") == "req_scripted"
