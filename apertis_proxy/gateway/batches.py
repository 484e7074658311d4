"""/v1/messages/batches, scoped to the key that created each batch.

A batch lives on the upstream account that created it and belongs to the key
that created it (owned_state, kind "batch"): another key gets 404 for it, and
lists show only the caller's own batches (each fetched from its account).
`results_url` is rewritten to the gateway.  Results are billed once, at the
batch price (half the list rates), and only for `succeeded` results: the
first fetch of an ended batch's results carries their usage and cost, later
fetches cost nothing.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import orjson

from ..errors import GatewayError
from ..http.messages import Request
from ..http.protocol import Responder
from ..plugin_api import Caller, Channel, UsageRecord
from ..upstream.connection import UpstreamError
from . import contract
from .forward import request_info
from .ownership import BATCH, owner_of
from .paging import page
from .upstream_call import Answer, call
from .upstream_errors import fails_over, read_error
from .usage import UsageMeter, price

PREFIX = "/v1/messages/batches"
BATCH_PRICE = 0.5          # batch requests cost half the list rates, every token kind
_JSON = (b"content-type", b"application/json")


class BatchesEndpoint:
    def __init__(self, forwarder: Any) -> None:
        self.fw = forwarder          # MessagesForwarder: settings, plugins, pools, catalog, owned

    async def handle(self, req: Request, resp: Responder) -> None:
        fw = self.fw
        record = UsageRecord(request_id=resp.request_id, started_at=time.time(), endpoint=PREFIX, client=req.client)
        t0 = time.perf_counter()
        info = request_info(req, resp, None)
        try:
            caller, vouched_by = await fw.plugins.authenticate(info)
        except GatewayError as e:
            return _send_error(resp, e)
        record.key_id, record.key_name = caller.key_id, caller.key_name
        try:
            await self._dispatch(req, resp, caller, record)
        except GatewayError as e:
            record.status, record.error_type = e.status, e.error_type
            if not resp.started:
                _send_error(resp, e)
        finally:
            record.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
            record.status = record.status or resp.status
            try:
                await fw.plugins.finish(vouched_by, caller, record)
            finally:
                await fw.plugins.meter(record)

    async def _dispatch(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord) -> None:
        rest = req.path[len(PREFIX):].strip("/").split("/") if req.path != PREFIX else []
        method = req.method
        if not rest:
            if method == "POST":
                return await self._create(req, resp, caller, record)
            if method == "GET":
                return await self._list(req, resp, caller, record)
            raise _not_allowed("GET, POST")
        batch_id = rest[0]
        if len(rest) == 1 and method in ("GET", "DELETE"):
            return await self._one(req, resp, caller, record, batch_id, method)
        if len(rest) == 2 and rest[1] == "cancel" and method == "POST":
            return await self._one(req, resp, caller, record, batch_id, method)
        if len(rest) == 2 and rest[1] == "results" and method == "GET":
            return await self._results(req, resp, caller, record, batch_id)
        raise GatewayError(404, f"Not found: {method} {req.path}", "not_found_error")

    # -- create ---------------------------------------------------------------

    async def _create(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord) -> None:
        fw = self.fw
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise GatewayError(400, "requests: must be a non-empty array of {custom_id, params}")
        for i, item in enumerate(requests):
            if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
                raise GatewayError(400, f"requests[{i}].custom_id: must be a string")
            params = item.get("params")
            if not isinstance(params, dict) or not isinstance(params.get("model"), str):
                raise GatewayError(400, f"requests[{i}].params: must be a Messages body with a model")
        client_version = _header(req, b"anthropic-version")
        last: Optional[Answer] = None
        for channel in await self._channels_for(req, resp, caller, {r["params"]["model"] for r in requests}):
            fitted = []
            version = contract.upstream_api_version(channel, client_version, fw.settings.default_api_version)
            for i, item in enumerate(requests):
                try:
                    prepared = contract.prepare_for_channel(item["params"], channel, client_version=client_version,
                                                            default_version=fw.settings.default_api_version)
                except GatewayError as e:
                    raise GatewayError(400, f"requests[{i}].params.{e.message}") from None
                fitted.append({**item, "params": prepared.body})
            payload = orjson.dumps({**body, "requests": fitted})
            last = await self._call(channel, "POST", PREFIX, req, payload, record, version)
            if last is None:
                continue
            if last.status == 200:
                batch = orjson.loads(last.body)
                fw.owned.remember(BATCH, batch["id"], owner_of(caller), channel.account, channel.id)
                return self._send_batch(req, resp, last, batch)
            if not fails_over(read_error(last.status, last.body, [channel.api_key]).cause):
                break
        self._send_answer(resp, last)

    async def _channels_for(self, req: Request, resp: Responder, caller: Caller, models: set[str]) -> list[Channel]:
        """The channels that serve every model of the batch, in the router's order for the first."""
        chosen: Optional[list[Channel]] = None
        for model in sorted(models):
            info = dataclasses.replace(request_info(req, resp, None), model=model)
            routed = list(await self.fw.plugins.route(info, caller) or [])
            if chosen is None:
                chosen = routed
            else:
                ids = {c.id for c in routed}
                chosen = [c for c in chosen if c.id in ids]
        if not chosen:
            raise GatewayError(404, f"model: no channel serves every model of this batch "
                                    f"({', '.join(sorted(models))}) for this key", "not_found_error")
        return chosen

    # -- one batch ------------------------------------------------------------

    async def _owned_channel(self, req: Request, resp: Responder, caller: Caller, batch_id: str) -> Channel:
        found = (await self.fw.owned.find([(BATCH, batch_id)])).get((BATCH, batch_id))
        if found is None or found.owner != owner_of(caller):
            raise GatewayError(404, f"message_batch_id: {batch_id} not found", "not_found_error")
        info = dataclasses.replace(request_info(req, resp, None), model=None, account=found.account)
        channels = [c for c in await self.fw.plugins.route(info, caller) or [] if c.account == found.account]
        if not channels:
            raise GatewayError(503, "the upstream account holding this batch has no enabled channel",
                               "overloaded_error")
        return channels[0]

    async def _one(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord, batch_id: str,
                   method: str) -> None:
        channel = await self._owned_channel(req, resp, caller, batch_id)
        answer = await self._call(channel, method, req.path, req, b"", record)
        if answer is None:
            raise GatewayError(502, "upstream unavailable", "api_error")
        if answer.status == 200 and method == "DELETE":
            self.fw.owned.forget(BATCH, batch_id)
        if answer.status == 200 and method != "DELETE":
            return self._send_batch(req, resp, answer, orjson.loads(answer.body))
        self._send_answer(resp, answer)

    async def _list(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord) -> None:
        owned = await self.fw.owned.owned_by(BATCH, owner_of(caller))
        page_ids, has_more = page(owned, [i for i, _ in owned], req.query, "message batch")
        data = []
        for batch_id, _ in page_ids:
            channel = await self._owned_channel(req, resp, caller, batch_id)
            answer = await self._call(channel, "GET", f"{PREFIX}/{batch_id}", req, b"", record)
            if answer is not None and answer.status == 200:
                data.append(self._rewritten(req, orjson.loads(answer.body)))
        record.status = 200
        resp.send(200, [_JSON], orjson.dumps({"data": data, "has_more": has_more,
                                              "first_id": data[0]["id"] if data else None,
                                              "last_id": data[-1]["id"] if data else None}))

    # -- results --------------------------------------------------------------

    async def _results(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord,
                       batch_id: str) -> None:
        channel = await self._owned_channel(req, resp, caller, batch_id)
        answer = await self._call(channel, "GET", f"{PREFIX}/{batch_id}/results", req, b"", record)
        if answer is None:
            raise GatewayError(502, "upstream unavailable", "api_error")
        if answer.status == 200 and await self.fw.owned.settle_once(BATCH, batch_id):
            bill_results(answer.body, record, self.fw.catalog.catalog)
        self._send_answer(resp, answer)

    # -- helpers --------------------------------------------------------------

    async def _call(self, channel: Channel, method: str, target: str, req: Request, body: bytes,
                    record: UsageRecord, version: Optional[str] = None) -> Optional[Answer]:
        fw = self.fw
        record.channel_id, record.channel_name = channel.id, channel.name
        record.attempts += 1
        if version is None:
            version = contract.upstream_api_version(channel, _header(req, b"anthropic-version"),
                                                    fw.settings.default_api_version)
        query = "?" + req.query if req.query and method == "GET" and target == req.path else ""
        try:
            answer = await call(fw.pools, channel, method, target + query, req.headers, body,
                                read_timeout=fw.settings.read_timeout, api_version=version)
        except (UpstreamError, ValueError):
            return None
        record.reached_upstream = True
        rid = answer.get(b"request-id")
        record.upstream_request_id = rid.decode("latin-1") if rid else None
        if answer.status >= 400:
            # The answer is passed on as the upstream gave it (redacted).
            error = read_error(answer.status, answer.body, [channel.api_key])
            answer.body = error.body
            record.error_type = error.error_type
        record.status = answer.status
        return answer

    def _rewritten(self, req: Request, batch: dict) -> dict:
        if batch.get("results_url"):
            host = (_header(req, b"host") or "127.0.0.1").strip()
            batch["results_url"] = f"http://{host}{PREFIX}/{batch['id']}/results"
        return batch

    def _send_batch(self, req: Request, resp: Responder, answer: Answer, batch: dict) -> None:
        resp.send(answer.status, [_JSON], orjson.dumps(self._rewritten(req, batch)))

    @staticmethod
    def _send_answer(resp: Responder, answer: Optional[Answer]) -> None:
        if answer is None:
            raise GatewayError(502, "upstream unavailable", "api_error")
        ctype = answer.get(b"content-type") or b"application/json"
        resp.send(answer.status, [(b"content-type", ctype)], answer.body)


def bill_results(jsonl: bytes, record: UsageRecord, catalog: Any) -> None:
    """Usage and cost of the succeeded results, at the batch price, into `record`."""
    cost = 0.0
    models = set()
    for line in jsonl.splitlines():
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        result = item.get("result") if isinstance(item, dict) else None
        if not isinstance(result, dict) or result.get("type") != "succeeded":
            continue
        message = result.get("message")
        if not isinstance(message, dict):
            continue
        one = UsageRecord(request_id=record.request_id, started_at=record.started_at, endpoint=record.endpoint,
                          upstream_model=message.get("model") if isinstance(message.get("model"), str) else None)
        UsageMeter(one).body(message)
        price(one, catalog)
        cost += one.cost * BATCH_PRICE
        models.add(one.upstream_model)
        for name in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
            setattr(record, name, getattr(record, name) + getattr(one, name))
        if len(models) == 1 and one.prices:
            record.prices = {k: (v * BATCH_PRICE if isinstance(v, float) else v) for k, v in one.prices.items()}
    record.cost = round(cost, 10)
    record.upstream_model = models.pop() if len(models) == 1 else None
    if record.upstream_model is None:
        record.prices = {"batch_price": BATCH_PRICE} if cost else None


def _header(req: Request, name: bytes) -> Optional[str]:
    value = req.header(name)
    return value.decode("latin-1") if value is not None else None


def _not_allowed(allowed: str) -> GatewayError:
    return GatewayError(405, f"method not allowed; use {allowed}", "invalid_request_error", {"allow": allowed})


def _send_error(resp: Responder, e: GatewayError) -> None:
    resp.send_error(e.status, e.message, e.error_type, [(k.encode(), str(v).encode()) for k, v in e.headers.items()])
