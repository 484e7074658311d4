"""Requests to the gateway of the `scripted` fixture (tests/conftest.py): a real gateway with key alice (`env.key`)
and one channel, `main`, to a ScriptedChannel (`env.channel`, see scripted_channel.py) that holds `CHANNEL_KEY`.
`ask()` is a Messages body (a stream unless told otherwise) and `post(env, body)` sends it with the gateway's key on
a connection of its own."""
from __future__ import annotations

from typing import Optional

from .gateway_requests import HAIKU
from .gateway_requests import post as post_as
from .rawhttp import RawResponse

CHANNEL_KEY = "sk-ant-scripted-channel-key-0123456789"


def ask(stream: bool = True, text: str = "hi") -> dict:
    return {"model": HAIKU, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": text}]}


async def post(env, body: dict, headers: Optional[dict] = None) -> RawResponse:
    """One request with the gateway's key `env.key`, on its own connection."""
    return await post_as(env, env.key, body, headers)
