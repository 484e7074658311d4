"""Requests the HTTP layer refuses before the gateway sees them are counted and logged.

Each kind of refusal is sent as raw bytes over a real socket to a gateway logging JSON: a malformed head (400), a
head whose body framing is ambiguous (400), a head too large (431, whole and still incomplete), a body too large
(413, announced and chunked), an HTTP version other than 1.x (505), a head that does not arrive in time (408), and a
connection over the cap while every connection is busy (503). Each must move `apertis_http_refusals_total` by
exactly one for its reason and code (read with prometheus_client's parser), leave `apertis_requests_total` alone,
and have one access-log line carrying the request id the client was given.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.support.rawhttp import RawConnection, RawResponse
from tests.support.metrics import scrape_samples, total, value

ACCESS = "apertis_proxy.access"
SMALL_LIMITS = {"log_format": "json", "max_header_bytes": 2048, "max_body_bytes": 1000}

# (reason, status, method and path as logged, request bytes)
REFUSALS = [
    ("malformed", 400, None, None, b"GET /health HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n"),
    ("framing", 400, "GET", "/health", b"GET /health?x=1 HTTP/1.1\r\nhost: x\r\nx-a: a\r\n folded\r\n\r\n"),
    ("framing", 400, "POST", "/v1/messages",
     b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("headers_too_large", 431, None, None, b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 3000),
    ("body_too_large", 413, "POST", "/v1/messages",
     b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n"),
    ("body_too_large", 413, "POST", "/v1/messages/count_tokens",    # a chunked body that grows too large
     b"POST /v1/messages/count_tokens HTTP/1.1\r\nhost: x\r\nx-api-key: KEY\r\ntransfer-encoding: chunked\r\n"
     b"\r\n7d0\r\n" + b"{" * 2000 + b"\r\n"),
    ("http_version", 505, "GET", "/health", b"GET /health HTTP/2.0\r\nhost: x\r\n\r\n"),
]


async def refuse(host: str, port: int, data: bytes) -> RawResponse:
    async with await RawConnection.open(host, port) as conn:
        await conn.send(data)
        response = await conn.read_response(method="GET")
        assert await conn.wait_closed_by_peer()
    return response


def access_lines(gateway, capsys) -> list[dict]:
    gateway.observe.access_log.flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == ACCESS]


def assert_refusal_logged(line: dict, response: RawResponse, status: int, method, path) -> None:
    assert line["status"] == status
    assert line["error_type"] == response.json()["error"]["type"]
    assert (line["method"], line["path"]) == (method, path)
    assert line["message"] == f"{method or '-'} {path or '-'} {status}"
    assert line["client"].startswith("127.0.0.1:")
    assert (line["key_name"], line["channel_name"], line["attempts"], line["input_tokens"]) == (None, None, 0, 0)


async def test_each_refusal_of_the_http_layer_is_counted_and_logged_with_its_request_id(gateway_env, capsys):
    key = gateway_env.add_key("alice")      # admitted on its head: the body is read, then refused
    gateway = await gateway_env.start(**SMALL_LIMITS)
    host, port = gateway.host, gateway.port
    before = await scrape_samples(gateway_env.base_url)
    assert total(before, "apertis_http_refusals_total") == 0

    responses = []
    for reason, status, _, _, data in REFUSALS:
        response = await refuse(host, port, data.replace(b"KEY", key.encode()))
        assert response.status == status, (reason, response.body)
        assert response.json()["type"] == "error"
        assert response.header("request-id") == response.json()["request_id"]
        responses.append(response)

    after = await scrape_samples(gateway_env.base_url)
    expected = Counter((reason, str(status)) for reason, status, *_ in REFUSALS)
    for (reason, code), n in expected.items():
        assert value(after, "apertis_http_refusals_total", reason=reason, code=code) == n, (reason, code)
    assert total(after, "apertis_http_refusals_total") == len(REFUSALS)
    # Only the first scrape is a request the gateway answered.
    assert total(after, "apertis_requests_total") == 1 == value(
        after, "apertis_requests_total", endpoint="/metrics", model="none", channel="none", code="200")

    lines = access_lines(gateway, capsys)
    by_id = {line["request_id"]: line for line in lines}
    for (_, status, method, path, _), response in zip(REFUSALS, responses):
        assert_refusal_logged(by_id[response.header("request-id")], response, status, method, path)
    assert len(lines) == len(REFUSALS) + 2       # and the two scrapes


async def test_a_late_head_and_a_connection_over_the_cap_are_counted_and_logged(gateway_env, capsys):
    gateway = await gateway_env.start(max_connections=2, header_timeout=1.5, **SMALL_LIMITS)
    host, port = gateway.host, gateway.port
    # Two connections in the middle of a head: both busy, so a third finds no room.
    slow = [await RawConnection.open(host, port) for _ in range(2)]
    for conn in slow:
        await conn.send(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
    capped = await RawConnection.open(host, port)
    over_cap = await capped.read_response(method="GET")
    assert over_cap.status == 503 and over_cap.json()["error"]["type"] == "overloaded_error"
    capped.close()
    late = [await conn.read_response(method="GET") for conn in slow]     # after header_timeout
    assert [r.status for r in late] == [408, 408]
    for conn in slow:
        assert await conn.wait_closed_by_peer()
        conn.close()

    samples = await scrape_samples(gateway_env.base_url)
    assert value(samples, "apertis_http_refusals_total", reason="connection_cap", code="503") == 1
    assert value(samples, "apertis_http_refusals_total", reason="timeout", code="408") == 2
    assert total(samples, "apertis_http_refusals_total") == 3

    by_id = {line["request_id"]: line for line in access_lines(gateway, capsys)}
    assert_refusal_logged(by_id[over_cap.header("request-id")], over_cap, 503, None, None)
    for response in late:
        assert_refusal_logged(by_id[response.header("request-id")], response, 408, None, None)


async def test_refusals_are_counted_without_the_access_log(gateway_env, capsys):
    gateway = await gateway_env.start(access_log=False, **SMALL_LIMITS)
    response = await refuse(gateway.host, gateway.port, REFUSALS[-1][-1])
    assert response.status == 505
    samples = await scrape_samples(gateway_env.base_url)
    assert value(samples, "apertis_http_refusals_total", reason="http_version", code="505") == 1
    assert gateway.observe.access_log is None
    assert ACCESS not in capsys.readouterr().err


@pytest.mark.parametrize("observe", [{"metrics_enabled": False, "access_log": False}], ids=["all-off"])
async def test_with_observability_off_refusals_are_still_answered(gateway_env, observe):
    gateway = await gateway_env.start(**observe, **SMALL_LIMITS)
    assert gateway.state.refused is None
    response = await refuse(gateway.host, gateway.port, REFUSALS[0][-1])
    assert response.status == 400 and response.json()["error"]["type"] == "invalid_request_error"


async def test_a_body_refused_on_its_credential_is_logged_with_the_request_id_the_client_got(gateway_env, capsys):
    """The gateway's own head check (an unknown key, before a body still to come is read) is the gateway's answer:
    counted in apertis_requests_total, not as a refusal of the HTTP layer, and logged with the id sent."""
    gateway = await gateway_env.start(**SMALL_LIMITS)
    response = await refuse(gateway.host, gateway.port,
                            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: sk-apx-not-a-key\r\n"
                            b"transfer-encoding: chunked\r\n\r\n")
    assert response.status == 401 and response.json()["error"]["type"] == "authentication_error"
    samples = await scrape_samples(gateway_env.base_url)
    assert value(samples, "apertis_requests_total", endpoint="/v1/messages", model="none", channel="none",
                 code="401") == 1
    assert total(samples, "apertis_http_refusals_total") == 0
    by_id = {line["request_id"]: line for line in access_lines(gateway, capsys)}
    assert_refusal_logged(by_id[response.header("request-id")], response, 401, "POST", "/v1/messages")
