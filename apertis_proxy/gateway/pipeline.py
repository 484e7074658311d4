"""Path routing: which endpoint handles a request; browsers' CORS preflights are answered here.  Everything else
is 404/405."""
from __future__ import annotations

import time
from typing import Optional, Union
from urllib.parse import parse_qsl

import orjson

from ..errors import GatewayError
from ..http.request import Request
from ..http.responder import Responder
from ..plugin_api import Caller, ModelInfo, RequestInfo, UsageRecord
from ..plugin_host import PluginHost
from .batches import BatchesEndpoint
from .files import FilesEndpoint
from .client_address import ClientAddress
from .cors import Cors
from .forward import MessagesForwarder, request_info
from .paging import page

_JSON = (b"content-type", b"application/json")
_MESSAGES = ("/v1/messages", "/v1/messages/count_tokens")

# API paths that act for a whole upstream account, never forwarded with a
# channel's key: first path segment after /v1/ -> why.
_ACCOUNT_WIDE = {
    "organizations": "the Admin API manages the whole upstream organisation",
    "user_profiles": "user profiles choose who the upstream account bills",
    "compliance": "compliance exports cover every user of the upstream account",
    "skills": "skills are shared by everyone on the upstream account",
    **dict.fromkeys(("agents", "sessions", "environments", "vaults", "memory_stores", "deployments",
                     "deployment_runs", "dreams", "tunnels", "webhooks"),
                    "managed agents run with the upstream account's own credentials and data"),
}


def account_wide(path: str) -> Optional[str]:
    """Why `path` is not served, when it is one of the account-wide APIs."""
    if not path.startswith("/v1/"):
        return None
    return _ACCOUNT_WIDE.get(path[4:].split("/", 1)[0])


class GatewayApp:
    """The application behind the HTTP layer: `await app(request, responder)`."""

    def __init__(self, forwarder: MessagesForwarder, plugins: PluginHost,
                 client_address: Optional[ClientAddress] = None) -> None:
        self.forwarder = forwarder
        self.plugins = plugins
        self.client_address = client_address     # set when requests come through trusted proxies
        # Account-bound resources need the ownership records.
        self.owned_endpoints = ([BatchesEndpoint(forwarder), FilesEndpoint(forwarder)]
                                if forwarder.owned is not None else [])
        self.cors: Optional[Cors] = forwarder.cors

    def check_head(self, head: Request) -> Union[GatewayError, int, None]:
        """The HTTP layer asks before reading a body: a /v1/ request whose
        credential no auth plugin will admit is refused from its head alone
        (the error); one no plugin vouched for gets the smaller unvouched body
        limit (an int); None: read the body up to the full limit."""
        if not head.path.startswith("/v1/"):
            return None
        if self.client_address is not None:     # plugins, and the log line of a refusal, see the client
            head.client = self.client_address.resolve(head.client, head.headers)
        info = RequestInfo(method=head.method, path=head.path, query=head.query, headers=head.header_map(),
                           body=None, model=None, stream=False, client=head.client, request_id="")
        try:
            vouched = self.plugins.check_head(info)
        except GatewayError as e:
            return e
        settings = self.forwarder.settings
        if vouched or settings.max_unvouched_body_bytes >= settings.max_body_bytes:
            return None
        return settings.max_unvouched_body_bytes

    async def __call__(self, req: Request, resp: Responder) -> None:
        if self.client_address is not None:
            req.client = self.client_address.resolve(req.client, req.headers)
        path = req.path
        if req.method == "POST":
            # The forwarder looks a browser page's Origin up in the header map it builds anyway.
            if path == "/v1/messages":
                return await self.forwarder.handle(req, resp)
            if path == "/v1/messages/count_tokens":
                return await self.forwarder.handle(req, resp, count_tokens=True)
        cors = self.cors
        if cors is not None and path.startswith("/v1/") and self._serve_cors(cors, req, resp):
            return
        if path in _MESSAGES:
            return _method_not_allowed(resp, "POST")
        if _is_models(path):
            if req.method not in ("GET", "HEAD"):
                return _method_not_allowed(resp, "GET, HEAD")
            return await self._models(req, resp)
        for endpoint in self.owned_endpoints:
            if endpoint.serves(path):
                return await endpoint.handle(req, resp)
        if path in ("/health", "/healthz"):
            return resp.send(200, [_JSON], b'{"status":"ok"}')
        refused = account_wide(path)
        if refused is not None:
            return resp.send_error(404, f"{path} is not available through this gateway: {refused}",
                                   "not_found_error")
        resp.send_error(404, f"Not found: {req.method} {path}", "not_found_error")

    def _serve_cors(self, cors: Cors, req: Request, resp: Responder) -> bool:
        """The CORS part of a request from a browser page of an allowed origin: a preflight is answered here
        (True); any other request's answer, whatever it turns out to be, is marked readable by the page."""
        origin = req.header(b"origin")
        if origin is None:
            return False
        page = origin.decode("latin-1")
        if not cors.allows(page):
            return False
        if req.method == "OPTIONS" and req.header(b"access-control-request-method") is not None:
            methods = self._methods(req.path)
            if methods is not None:
                cors.answer_preflight(resp, page, methods, req.header(b"access-control-request-headers"))
                return True
        cors.mark(resp, page)
        return False

    def _methods(self, path: str) -> Optional[bytes]:
        """The methods `path` serves, as a preflight's answer names them; None: nothing here serves it."""
        if path in _MESSAGES:
            return b"POST"
        if _is_models(path):
            return b"GET"
        if any(endpoint.serves(path) for endpoint in self.owned_endpoints):
            return b"GET, POST, DELETE"
        return None

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
        resp.hold_end()
        try:
            self._list_models(req, resp, caller)
        finally:
            record.status = resp.status
            try:
                await self.plugins.release(vouched_by, caller, record)
            finally:
                resp.release()
            await self.plugins.finish(vouched_by, caller, record)

    def _list_models(self, req: Request, resp: Responder, caller: Caller) -> None:
        models = sorted(self.plugins.models(caller), key=lambda m: (m.created_at, m.id), reverse=True)
        if req.path == "/v1/models":
            try:
                page = paginate(filter_lifecycle(models, req.query), req.query)
            except GatewayError as e:
                return resp.send_error(e.status, e.message, e.error_type)
            return resp.send(200, [_JSON], orjson.dumps(page))
        wanted = req.path[len("/v1/models/"):]
        # An alias the catalogue knows answers with the model it names, as the Models API resolves one.
        entry = self.forwarder.catalog.catalog.by_name.get(wanted)
        for name in (wanted, entry.id) if entry is not None else (wanted,):
            for m in models:
                if m.id == name:
                    return resp.send(200, [_JSON], orjson.dumps(_model_json(m)))
        resp.send_error(404, f"model: {wanted} not found", "not_found_error")


def _is_models(path: str) -> bool:
    return path == "/v1/models" or path.startswith("/v1/models/")


def _model_json(m: ModelInfo) -> dict:
    """The fields the current SDK reads (types/model_info.py); unknown ones are null."""
    return {"type": "model", "id": m.id, "display_name": m.display_name, "created_at": m.created_at,
            "lifecycle": m.lifecycle, "deprecated_at": m.deprecated_at, "retires_at": m.retires_at,
            "line": m.line, "max_input_tokens": m.max_input_tokens, "max_tokens": m.max_tokens,
            "capabilities": m.capabilities}


LIFECYCLES = ("active", "deprecated", "retired")


def filter_lifecycle(models: list[ModelInfo], query: str) -> list[ModelInfo]:
    """`lifecycle` (repeated, `lifecycle[]` as the SDK sends it, or comma-separated):
    the stages to list; without it, active and deprecated models (retired ones are hidden)."""
    wanted: set[str] = set()
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in ("lifecycle", "lifecycle[]"):
            wanted.update(v for v in value.split(",") if v)
    unknown = wanted - set(LIFECYCLES)
    if unknown:
        raise GatewayError(400, f"lifecycle: unknown value(s) {', '.join(sorted(unknown))}; "
                                f"use {', '.join(LIFECYCLES)}")
    wanted = wanted or {"active", "deprecated"}
    return [m for m in models if m.lifecycle in wanted]


def paginate(models: list[ModelInfo], query: str) -> dict:
    """Anthropic's list shape: data, has_more, first_id, last_id; after_id/before_id/limit."""
    chosen, has_more = page(models, [m.id for m in models], query, "model")
    return {"data": [_model_json(m) for m in chosen], "has_more": has_more,
            "first_id": chosen[0].id if chosen else None, "last_id": chosen[-1].id if chosen else None}


def _method_not_allowed(resp: Responder, allowed: str) -> None:
    resp.send_error(405, f"method not allowed; use {allowed}", "invalid_request_error",
                    [(b"allow", allowed.encode())])
