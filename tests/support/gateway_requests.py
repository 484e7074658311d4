"""Messages requests to a gateway over raw HTTP (one connection each), and the small waits and checks the e2e and ops
tests share."""
from __future__ import annotations

import asyncio
import itertools
import re
import socket
from typing import Any, Optional

from apertis_proxy import cli

from .mock_upstream import MockUpstream
from .rawhttp import RawConnection, RawResponse, request_bytes

HAIKU = "claude-haiku-4-5-20251001"
SONNET = "claude-sonnet-4-5-20250929"
REQUEST_ID = re.compile(r"req_[0-9a-f]{24}")
_seq = itertools.count(1)


def message(text: str = "route me", *, stream: bool = False, model: str = HAIKU, **extra: Any) -> dict:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}],
            "stream": stream, **extra}


async def post(env, key: str, body: dict, headers: Optional[dict] = None) -> RawResponse:
    """One request on its own connection."""
    async with await RawConnection.open(env.gateway.host, env.gateway.port) as conn:
        return await conn.request("POST", "/v1/messages", {"x-api-key": key, **(headers or {})}, json_body=body)


async def post_tagged(env, key: str, body: dict, headers: Optional[dict] = None) -> tuple[RawResponse, str]:
    """One request on its own connection, tagged with a unique `x-test-seq` header (forwarded like any unknown
    header, so the mock that received it can be found); returns the response and the tag."""
    tag = str(next(_seq))
    return await post(env, key, body, {"x-test-seq": tag, **(headers or {})}), tag


async def complete(gateway, n: int, stream: bool) -> str:
    """One request read to its last byte; its request id.  `gateway`: anything with the `port` it listens on at
    127.0.0.1 and a `key`."""
    async with await RawConnection.open("127.0.0.1", gateway.port) as conn:
        response = await conn.request("POST", "/v1/messages", {"x-api-key": gateway.key},
                                      json_body=message(f"request {n} " + "words " * (n % 7), stream=stream))
    assert response.status == 200
    if stream:
        assert response.sse_events()[-1][0] == "message_stop"
    return response.header("request-id")


async def abandoned(gateway, n: int) -> str:
    """A paced stream the client walks away from after its first events; its request id.  `gateway` as for
    `complete`."""
    conn = await RawConnection.open("127.0.0.1", gateway.port)
    try:
        await conn.send(request_bytes("POST", "/v1/messages", {
            "x-api-key": gateway.key, "x-mock-scenario": "event-delay=0.02; message-deltas=3"},
            json_body=message(f"abandoned {n}", stream=True)))
        head = await conn.read_head()
        assert head.status == 200
        async for _ in conn.iter_chunks(head):
            break
        return head.header("request-id")
    finally:
        conn.abort()


def receivers(tag: str, mocks: dict[str, MockUpstream]) -> list[str]:
    """Names of the mocks that received the request tagged `tag`, in no particular order."""
    return [name for name, mock in mocks.items()
            if any(r.headers.get("x-test-seq") == tag for r in mock.requests)]


def closed_port_url() -> str:
    """A URL on which nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def channels_list(db: str, capsys) -> dict[str, str]:
    """`apertis-proxy channels list`, one output line per channel name."""
    capsys.readouterr()
    assert cli.main(["channels", "list", "--db", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line for line in lines[1:] if line.strip()}


async def poll(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(interval)


def assert_error(response: RawResponse, status: int, error_type: str, message_part: str = "") -> dict:
    """An error in Anthropic's shape with this status and type (its message containing `message_part`), and the
    gateway's request id both in the `request-id` header and in the body."""
    assert response.status == status, response.body
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type, body
    assert message_part in body["error"]["message"]
    assert REQUEST_ID.fullmatch(response.header("request-id") or ""), response.headers
    assert body["request_id"] == response.header("request-id")
    return body
