"""/v1/messages/batches, scoped to the key that created each batch (see owned_endpoint.py).

Every request of a batch is held to the rules of a Messages request
(batch_admission.py); the batch goes to one channel serving all its models,
each request's params fitted to that channel like a Messages body.  `results_url` is rewritten to
the gateway.  Results are billed once, at the batch price (half the list
rates) in force when the batch was created, and only for `succeeded` results: the first fetch of an ended batch's
results carries their usage and cost, later fetches cost nothing.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Optional, Sequence

import orjson

from ..errors import GatewayError
from ..http.request import Request
from ..http.responder import Responder
from ..plugin_api import Caller, Channel, UsageRecord, billed_apart
from . import contract, exact_json
from .batch_admission import admit, named, refuse_quota
from .owned_endpoint import OwnedEndpoint, header, passed_down, with_query
from .ownership import BATCH
from .pricing import cache_split, price
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

    def refusal(self, req: Request, caller: Caller) -> Optional[GatewayError]:
        """A key with a quota cannot create batches (batch_admission.refuse_quota)."""
        if req.method == "POST" and req.path.rstrip("/") == PREFIX:
            try:
                refuse_quota(caller)
            except GatewayError as e:
                return e
        return None

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
            payload = exact_json.dumps({**body, "requests": fitted}, req.body)
            last = await self.call(channel, "POST", with_query(PREFIX, req), req, payload, record, version, billed=True)
            if last is None:
                continue
            if last.status == 200:
                batch = orjson.loads(last.body)
                self.remember(batch["id"], caller, channel)
                return self._send_batch(req, resp, last, batch, record, admitted.headers)
            if not fails_over(read_error(last.status, last.body, [channel.api_key]).cause):
                break
        self.send_answer(resp, last, record)

    async def _one(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord, batch_id: str) -> None:
        answer = await self.forward_item(req, resp, caller, record, batch_id)
        if answer is not None and answer.status == 200 and req.method != "DELETE":
            return self._send_batch(req, resp, answer, orjson.loads(answer.body), record)
        self.send_answer(resp, answer, record)

    # -- results --------------------------------------------------------------

    async def _results(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord,
                       batch_id: str) -> None:
        channel = await self.owned_channel(req, resp, caller, batch_id)
        answer = await self.call(channel, "GET", with_query(f"{PREFIX}/{batch_id}/results", req), req, b"", record)
        if answer is None:
            raise GatewayError(502, "upstream unavailable", "api_error")
        if answer.status == 200:
            # Everything that awaits comes before the batch is marked settled: from the mark to the row in
            # the spool (checkpoint) nothing can cut the request but a crash within the same few steps.
            results_id = record.upstream_request_id
            created = await self._created_at(channel, req, record, batch_id)
            record.upstream_request_id = results_id         # the row and the answer name the results' call
            if await self.fw.owned.settle_once(BATCH, batch_id):
                bill_results(answer.body, record, self.fw.catalog.catalog, created)
                record.status, record.error_type = 200, None      # the results were served, whatever the lookup
                self.fw.plugins.checkpoint(record)
        self.send_answer(resp, answer, record)

    async def _created_at(self, channel: Channel, req: Request, record: UsageRecord, batch_id: str) -> float:
        """When the batch was created (the prices of that moment apply), as its account says;
        the owned_state record keeps no time the gateway can read.  Now, if the account
        does not answer."""
        answer = await self.call(channel, "GET", f"{PREFIX}/{batch_id}", req, b"", record)
        try:
            stamp = orjson.loads(answer.body)["created_at"] if answer is not None and answer.status == 200 else None
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            return time.time()

    # -- helpers --------------------------------------------------------------

    def shown(self, req: Request, batch: dict) -> dict:
        """The batch with its results_url on the gateway: `[server] public_url`, else the request's Host, by
        https when the listener has TLS (the SDKs fetch the results from that very URL)."""
        if batch.get("results_url"):
            settings = self.fw.settings
            base = settings.public_url
            if base is None:
                scheme = "https" if settings.tls_cert else "http"
                base = f"{scheme}://{(header(req, b'host') or '127.0.0.1').strip()}"
            batch["results_url"] = f"{base.rstrip('/')}{PREFIX}/{batch['id']}/results"
        return batch

    def _send_batch(self, req: Request, resp: Responder, answer: Answer, batch: dict, record: UsageRecord,
                    notices: Sequence[tuple[bytes, bytes]] = ()) -> None:
        resp.send(answer.status, [*passed_down(answer, record, ()), *notices], orjson.dumps(self.shown(req, batch)))


_COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
           "web_search_requests", "web_fetch_requests")
# The cache writes by TTL, as each result was billed (cache_split): summed like the counts.
_SPLIT = ("cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens")


def bill_results(jsonl: bytes, record: UsageRecord, catalog: Any, created_at: float) -> None:
    """Usage and cost of the succeeded results, at the batch tier's price when the batch was
    created (`created_at`, unix time), into `record`.

    Each result is priced as its own request (service tier "batch"); the sum is exact, and
    unknown (None) if any result's model has no price.  `record.prices` describes the whole:
    the total cost (an exact decimal string), the tier, the pricing time and, per model, the
    summed counts (cache writes also by TTL) and cost.  `record.iterations` keeps the results'
    iterations billed apart from their counts (advisor, compaction, fallback)."""
    total = Decimal(0)
    unpriced = False
    per_model: dict[str, dict[str, Any]] = {}
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
        one = UsageRecord(request_id=record.request_id, started_at=created_at, endpoint=record.endpoint,
                          upstream_model=message.get("model") if isinstance(message.get("model"), str) else None)
        UsageMeter(one).body(message)
        one.service_tier = "batch"
        price(one, catalog)
        model = per_model.setdefault(str(one.upstream_model),
                                     {**{name: 0 for name in (*_COUNTS, *_SPLIT)}, "cost": Decimal(0)})
        if one.cost is None:
            unpriced = True
            model["cost"] = None
        else:
            cost = Decimal(one.prices["cost"]) if one.prices and "cost" in one.prices else Decimal(0)
            total += cost
            if model["cost"] is not None:
                model["cost"] += cost
        for name in _COUNTS:
            model[name] += getattr(one, name)
            setattr(record, name, getattr(record, name) + getattr(one, name))
        for name, tokens in zip(_SPLIT, cache_split(one.cache_creation_input_tokens,
                                                    one.cache_creation_1h_input_tokens)):
            model[name] += tokens
            setattr(record, name, (getattr(record, name) or 0) + tokens)
        separate = list(billed_apart(one.iterations))
        if separate:
            # Billed apart from the counts above: kept so that a token quota counts them (billed_tokens).
            record.iterations = [*(record.iterations or ()), *separate]
    if not per_model:
        record.cost, record.prices = 0.0, None
        return
    record.service_tier = "batch"
    record.cost = None if unpriced else float(total.quantize(Decimal("1e-10")))
    record.upstream_model = next(iter(per_model)) if len(per_model) == 1 else None
    for model in per_model.values():
        model["cost"] = None if model["cost"] is None else str(model["cost"])
    record.prices = {"cost": None if unpriced else str(total), "service_tier": "batch",
                     "priced_at": datetime.fromtimestamp(created_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "models": per_model}
