"""/v1/messages/batches, scoped to the key that created each batch (see owned_endpoint.py).

Every request of a batch is held to the rules of a Messages request
(batch_admission.py); the batch goes to one channel serving all its models,
each request's params fitted to that channel like a Messages body.  `results_url` is rewritten to
the gateway.  Results are billed once, at the batch price (half the list
rates), and only for `succeeded` results: the first fetch of an ended batch's
results carries their usage and cost, later fetches cost nothing.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Optional, Sequence

import orjson

from ..errors import GatewayError
from ..http.messages import Request
from ..http.protocol import Responder
from ..plugin_api import Caller, UsageRecord
from . import contract
from .batch_admission import admit, named, refuse_quota
from .owned_endpoint import OwnedEndpoint, header
from .ownership import BATCH
from .pricing import price
from .upstream_call import Answer
from .upstream_errors import fails_over, read_error
from .usage import UsageMeter

PREFIX = "/v1/messages/batches"
_JSON = (b"content-type", b"application/json")


class BatchesEndpoint(OwnedEndpoint):
    prefix = PREFIX
    kind = BATCH
    noun = "message_batch_id"

    async def item(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord,
                   rest: list[str]) -> None:
        method = req.method
        batch_id = rest[0]
        if (len(rest) == 1 and method in ("GET", "DELETE")) or (rest[1:] == ["cancel"] and method == "POST"):
            return await self._one(req, resp, caller, record, batch_id)
        if rest[1:] == ["results"] and method == "GET":
            return await self._results(req, resp, caller, record, batch_id)
        raise GatewayError(404, f"Not found: {method} {req.path}", "not_found_error")

    # -- create ---------------------------------------------------------------

    async def create(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord) -> None:
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
        refuse_quota(caller)
        admitted = await admit(fw, req, resp, caller, requests, record.started_at)
        client_version = header(req, b"anthropic-version")
        last: Optional[Answer] = None
        for channel in admitted.channels:
            fitted = []
            version = contract.upstream_api_version(channel, client_version, fw.settings.default_api_version)
            for i, item in enumerate(admitted.requests):
                try:
                    prepared = contract.prepare_for_channel(item["params"], channel, client_version=client_version,
                                                            default_version=fw.settings.default_api_version,
                                                            catalog_rules=fw.catalog.rules_of)
                except GatewayError as e:
                    raise named(i, e) from None
                fitted.append({**item, "params": prepared.body})
            payload = orjson.dumps({**body, "requests": fitted})
            last = await self.call(channel, "POST", PREFIX, req, payload, record, version)
            if last is None:
                continue
            if last.status == 200:
                batch = orjson.loads(last.body)
                self.remember(batch["id"], caller, channel)
                return self._send_batch(req, resp, last, batch, admitted.headers)
            if not fails_over(read_error(last.status, last.body, [channel.api_key]).cause):
                break
        self.send_answer(resp, last)

    async def _one(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord, batch_id: str) -> None:
        answer = await self.forward_item(req, resp, caller, record, batch_id)
        if answer is not None and answer.status == 200 and req.method != "DELETE":
            return self._send_batch(req, resp, answer, orjson.loads(answer.body))
        self.send_answer(resp, answer)

    # -- results --------------------------------------------------------------

    async def _results(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord,
                       batch_id: str) -> None:
        channel = await self.owned_channel(req, resp, caller, batch_id)
        answer = await self.call(channel, "GET", f"{PREFIX}/{batch_id}/results", req, b"", record)
        if answer is None:
            raise GatewayError(502, "upstream unavailable", "api_error")
        if answer.status == 200 and await self.fw.owned.settle_once(BATCH, batch_id):
            bill_results(answer.body, record, self.fw.catalog.catalog)
        self.send_answer(resp, answer)

    # -- helpers --------------------------------------------------------------

    def shown(self, req: Request, batch: dict) -> dict:
        """The batch with its results_url on the gateway."""
        if batch.get("results_url"):
            host = (header(req, b"host") or "127.0.0.1").strip()
            batch["results_url"] = f"http://{host}{PREFIX}/{batch['id']}/results"
        return batch

    def _send_batch(self, req: Request, resp: Responder, answer: Answer, batch: dict,
                    notices: Sequence[tuple[bytes, bytes]] = ()) -> None:
        resp.send(answer.status, [_JSON, *notices], orjson.dumps(self.shown(req, batch)))


def bill_results(jsonl: bytes, record: UsageRecord, catalog: Any) -> None:
    """Usage and cost of the succeeded results, at the batch tier's price, into `record`.

    Each result is priced as its own request (service tier "batch"); the sum is
    exact, and unknown (None) if any result's model has no price."""
    total = Decimal(0)
    unpriced = False
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
        one.service_tier = "batch"
        price(one, catalog)
        if one.cost is None:
            unpriced = True
        elif one.prices and "cost" in one.prices:
            total += Decimal(one.prices["cost"])
        models.add(one.upstream_model)
        for name in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
                     "web_search_requests", "web_fetch_requests"):
            setattr(record, name, getattr(record, name) + getattr(one, name))
        if len(models) == 1:
            record.prices = one.prices
    record.service_tier = "batch" if models else record.service_tier
    record.cost = None if unpriced else float(total.quantize(Decimal("1e-10")))
    record.upstream_model = models.pop() if len(models) == 1 else None
    if record.upstream_model is None:
        record.prices = {"service_tier": "batch", "cost": str(total)} if models or total else None
