"""Path routing: which endpoint handles a request.  Everything else is 404/405."""
from __future__ import annotations

import time
from typing import Optional

import orjson

from ..errors import GatewayError
from ..http.messages import Request
from ..http.protocol import Responder
from ..plugin_api import Caller, ModelInfo, UsageRecord
from ..plugin_host import PluginHost
from .client_address import ClientAddress
from .forward import MessagesForwarder, request_info

_JSON = (b"content-type", b"application/json")


class GatewayApp:
    """The application behind the HTTP layer: `await app(request, responder)`."""

    def __init__(self, forwarder: MessagesForwarder, plugins: PluginHost,
                 client_address: Optional[ClientAddress] = None) -> None:
        self.forwarder = forwarder
        self.plugins = plugins
        self.client_address = client_address     # set when requests come through trusted proxies

    async def __call__(self, req: Request, resp: Responder) -> None:
        if self.client_address is not None:
            req.client = self.client_address.resolve(req.client, req.headers)
        path = req.path
        if path == "/v1/messages":
            if req.method != "POST":
                return _method_not_allowed(resp, "POST")
            return await self.forwarder.handle(req, resp)
        if path == "/v1/messages/count_tokens":
            if req.method != "POST":
                return _method_not_allowed(resp, "POST")
            return await self.forwarder.handle(req, resp, count_tokens=True)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if req.method not in ("GET", "HEAD"):
                return _method_not_allowed(resp, "GET, HEAD")
            return await self._models(req, resp)
        if path in ("/health", "/healthz"):
            return resp.send(200, [_JSON], b'{"status":"ok"}')
        resp.send_error(404, f"Not found: {req.method} {path}", "not_found_error")

    async def _models(self, req: Request, resp: Responder) -> None:
        try:
            caller, vouched_by = await self.plugins.authenticate(request_info(req, resp, None))
        except GatewayError as e:
            return resp.send_error(e.status, e.message, e.error_type,
                                   [(k.encode(), str(v).encode()) for k, v in e.headers.items()])
        # Every request an auth plugin admitted is finished, as the plugin API
        # promises (a listing held a concurrency slot for good without it).
        # Listings are not usage: nothing is metered.
        record = UsageRecord(request_id=resp.request_id, started_at=time.time(), endpoint=req.path,
                             client=req.client, key_id=caller.key_id, key_name=caller.key_name)
        try:
            self._list_models(req, resp, caller)
        finally:
            record.status = resp.status
            await self.plugins.finish(vouched_by, caller, record)

    def _list_models(self, req: Request, resp: Responder, caller: Caller) -> None:
        models = sorted(self.plugins.models(caller), key=lambda m: (m.created_at, m.id), reverse=True)
        if req.path == "/v1/models":
            try:
                page = paginate(models, req.query)
            except GatewayError as e:
                return resp.send_error(e.status, e.message, e.error_type)
            return resp.send(200, [_JSON], orjson.dumps(page))
        wanted = req.path[len("/v1/models/"):]
        for m in models:
            if m.id == wanted:
                return resp.send(200, [_JSON], orjson.dumps(_model_json(m)))
        resp.send_error(404, f"model: {wanted} not found", "not_found_error")


def _model_json(m: ModelInfo) -> dict:
    return {"type": "model", "id": m.id, "display_name": m.display_name, "created_at": m.created_at}


def paginate(models: list[ModelInfo], query: str) -> dict:
    """Anthropic's list shape: data, has_more, first_id, last_id; after_id/before_id/limit."""
    params = dict(p.split("=", 1) if "=" in p else (p, "") for p in query.split("&") if p)
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        raise GatewayError(400, "limit: must be an integer") from None
    if not 1 <= limit <= 1000:
        raise GatewayError(400, "limit: must be between 1 and 1000")
    ids = [m.id for m in models]
    start, end = 0, len(models)
    after: Optional[str] = params.get("after_id")
    before: Optional[str] = params.get("before_id")
    if after:
        if after not in ids:
            raise GatewayError(400, f"after_id: unknown model id {after}")
        start = ids.index(after) + 1
    if before:
        if before not in ids:
            raise GatewayError(400, f"before_id: unknown model id {before}")
        end = ids.index(before)
    window = models[start:end]
    # Paging backwards (before_id alone) takes the page nearest to before_id.
    page = window[-limit:] if before and not after else window[:limit]
    has_more = len(window) > limit
    return {"data": [_model_json(m) for m in page], "has_more": has_more,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


def _method_not_allowed(resp: Responder, allowed: str) -> None:
    resp.send_error(405, f"method not allowed; use {allowed}", "invalid_request_error",
                    [(b"allow", allowed.encode())])
