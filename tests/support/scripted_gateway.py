"""Requests to the gateway of the `scripted` fixture (tests/conftest.py): a real gateway with key alice (`env.key`)
and one channel, `main`, to a ScriptedChannel (`env.channel`, see scripted_channel.py) that holds `CHANNEL_KEY`.
`ask()` is a Messages body (a stream unless told otherwise) and `post(env, body)` sends it with the gateway's key on
a connection of its own; `stream_until(env, marker)` reads a stream's answer until `marker` and hands the connection
back (to leave, or to read on)."""
from __future__ import annotations

from typing import Optional

from .gateway_requests import HAIKU
from .gateway_requests import post as post_as
from .rawhttp import RawConnection, RawResponse, request_bytes

CHANNEL_KEY = "sk-ant-scripted-channel-key-0123456789"


def ask(stream: bool = True, text: str = "hi") -> dict:
    return {"model": HAIKU, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": text}]}


async def post(env, body: dict, headers: Optional[dict] = None) -> RawResponse:
    """One request with the gateway's key `env.key`, on its own connection."""
    return await post_as(env, env.key, body, headers)


async def stream_until(env, marker: bytes, body: Optional[dict] = None) -> tuple[RawConnection, bytes]:
    """A stream request (`ask()` unless `body`) with the gateway's key on a connection of its own, its answer (a 200)
    read until `marker` has come: (the connection, still open for the caller to leave or read on; what was read)."""
    conn = await RawConnection.open(env.gateway.host, env.gateway.port)
    try:
        await conn.send(request_bytes("POST", "/v1/messages", {"x-api-key": env.key}, json_body=body or ask()))
        head = await conn.read_head()
        assert head.status == 200
        seen = b""
        async for piece in conn.iter_chunks(head):
            seen += piece
            if marker in seen:
                break
    except BaseException:
        conn.abort()
        raise
    return conn, seen
