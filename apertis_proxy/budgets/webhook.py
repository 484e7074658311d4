"""POST a budget alert to the operator's webhook: one small HTTP/1.1 request per
attempt (h11 over asyncio streams), retried with exponential backoff.

Nothing here runs on a request's path: the keys plugin starts one task per
alert and forgets it.  A webhook that is slow, down or answers an error costs
that task some retries and a log line, never a request.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Optional
from urllib.parse import urlsplit

import h11
import orjson

ATTEMPT_TIMEOUT = 10.0      # seconds for one attempt: connect, send, response head and body
MAX_RESPONSE = 64 * 1024    # a webhook's answer is read (to reuse nothing) but never kept


class WebhookError(Exception):
    pass


def check_url(url: str) -> str:
    """The URL if it is an http(s) URL with a host, else ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


async def post_json(url: str, payload: dict, timeout: float = ATTEMPT_TIMEOUT) -> int:
    """POST `payload` as JSON; returns the status code, raises WebhookError or OSError on failure."""
    return await asyncio.wait_for(_post(url, orjson.dumps(payload)), timeout)


async def _post(url: str, body: bytes) -> int:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=ssl.create_default_context() if secure else None)
    try:
        conn = h11.Connection(h11.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]
        writer.write(conn.send(h11.Request(method="POST", target=target, headers=[
            ("host", host), ("content-type", "application/json"), ("content-length", str(len(body))),
            ("user-agent", "apertis-proxy budget alert"), ("connection", "close")])))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        status: Optional[int] = None
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(16384)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                received += len(event.data)
                if received > MAX_RESPONSE:
                    break
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if status is None:
            raise WebhookError("the webhook closed the connection without answering")
        return status
    except h11.ProtocolError as exc:
        raise WebhookError(f"the webhook's answer is not HTTP/1.1: {exc}") from None
    finally:
        writer.close()


async def deliver(url: str, payload: dict, *, attempts: int, backoff: float,
                  log: logging.Logger, on_attempt) -> bool:
    """Try up to `attempts` times, waiting backoff, 2*backoff, 4*backoff... between them.

    `on_attempt(ok, error)` is awaited after each attempt (it records the outcome).
    Returns whether the webhook accepted it (any 2xx)."""
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))
        error: Optional[str] = None
        try:
            status = await post_json(url, payload)
            if 200 <= status < 300:
                await on_attempt(True, None)
                return True
            error = f"HTTP {status}"
        except asyncio.TimeoutError:
            error = f"no answer within {ATTEMPT_TIMEOUT:g}s"
        except (OSError, WebhookError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        log.warning("budget webhook attempt %d of %d failed (%s): key %s, %s%% of its %s quota",
                    attempt + 1, attempts, error, payload.get("key"), payload.get("threshold"),
                    payload.get("period"))
        await on_attempt(False, error)
    return False
