"""`channels test`: one minimal real request to a channel, sent the way the gateway
sends one (its upstream pool and client, TLS included, and its upstream headers:
the channel's credential, anthropic-version and workspace headers)."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Optional

from .. import __version__
from ..gateway import upstream_call
from ..gateway.usage import redact
from ..plugin_api import Channel
from ..upstream.connection import UpstreamError
from ..upstream.pool import Pools
from .values import is_header_token

DEFAULT_TEST_MODEL = "claude-haiku-4-5-20251001"


class ProbeResult:
    __slots__ = ("ok", "status", "latency_ms", "detail")

    def __init__(self, ok: bool, status: Optional[int], latency_ms: float, detail: str) -> None:
        self.ok, self.status, self.latency_ms, self.detail = ok, status, latency_ms, detail


def probe_channel(channel: Channel, upstream_model: str, *, timeout: float = 30.0) -> ProbeResult:
    """Send one minimal real request (max_tokens 1) to the channel and describe the answer.

    Nothing returned contains the channel's key: every text is passed through
    `redact` in case an upstream or an exception echoes it.
    """
    key = channel.api_key
    if not key or not is_header_token(key):
        # Said plainly here: the header code refuses such a key with an error of its own.
        return ProbeResult(False, None, 0.0, "the channel's API key is empty or contains characters "
                                             "not allowed in an HTTP header; replace it with channels set")
    body = json.dumps({"model": upstream_model, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    started = time.perf_counter()
    try:
        answer = asyncio.run(_send(channel, body, timeout))
    except Exception as exc:   # any failure is reported, never raised with the key inside
        elapsed = (time.perf_counter() - started) * 1000
        detail = str(exc) if isinstance(exc, UpstreamError) else f"{type(exc).__name__}: {exc}"
        return ProbeResult(False, None, elapsed, redact(detail, key))
    elapsed = (time.perf_counter() - started) * 1000
    ok = 200 <= answer.status < 300
    request_id = answer.get(b"request-id")
    return ProbeResult(ok, answer.status, elapsed,
                       redact(_describe_reply(answer.body, ok, request_id and request_id.decode("latin-1")), key))


# What a client of the gateway would send beside the body; upstream_headers adds
# host, the credential, anthropic-version, content-length and the workspace headers.
_CLIENT_HEADERS = [(b"content-type", b"application/json"), (b"accept", b"application/json"),
                   (b"user-agent", f"apertis-proxy/{__version__} (channels test)".encode("ascii"))]


async def _send(channel: Channel, body: bytes, timeout: float) -> upstream_call.Answer:
    pools = Pools(max_idle=1, connect_timeout=timeout)
    try:
        return await upstream_call.call(pools, channel, "POST", "/v1/messages", _CLIENT_HEADERS, body,
                                        read_timeout=timeout, api_version=channel.api_version)
    finally:
        pools.close()
        await asyncio.sleep(0)      # let the closed transport finish before the loop goes


def _describe_reply(raw: bytes, ok: bool, request_id: Optional[str]) -> str:
    suffix = f" (request-id {request_id})" if request_id else ""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        snippet = raw[:300].decode("utf-8", "replace").strip()
        return f"{'reply' if ok else 'error'} (not JSON): {snippet or '(empty body)'}{suffix}"
    if ok:
        usage = data.get("usage") or {}
        counts = " ".join(f"{k}={v}" for k, v in usage.items() if isinstance(v, int))
        return (f"model: {data.get('model')}  stop_reason: {data.get('stop_reason')}"
                f"  usage: {counts or '-'}{suffix}")
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    message = error.get("message") or raw[:300].decode("utf-8", "replace")
    return f"error: {error.get('type', 'unknown')}: {message}{suffix}"
