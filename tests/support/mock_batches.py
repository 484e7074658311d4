"""Message Batches as the mock upstream serves them (one account's batches; see mock_upstream.py).

``POST /v1/messages/batches`` ``{"requests": [{"custom_id", "params"}]}`` checks the shape (400 otherwise) and
processes the whole batch at once: each request's params are validated like a Messages body (a failure is an
``errored`` result with the API's error body) and answered like one (a ``succeeded`` result with the message and its
usage). The batch is then ``ended``, with ``results_url`` an absolute URL on the mock. ``GET`` the batch, ``GET`` the
list (``limit``, ``after_id``, ``before_id``, newest first), ``POST .../cancel``, ``DELETE`` (only an ended batch)
and ``GET .../results`` (JSONL, ``content-type: application/binary``) behave as the API's.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

from .mock_replies import RequestRejected, error_body, message_json, new_id, plan_reply, validate_request

PREFIX = "/v1/messages/batches"


def _now(offset: float = 0.0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset))


class Batches:
    def __init__(self, mock: Any) -> None:
        self.mock = mock
        self.batches: dict[str, dict[str, Any]] = {}     # id -> the batch object, newest last
        self.results: dict[str, list[dict[str, Any]]] = {}

    def route(self, method: str, path: str) -> Optional[Any]:
        if path == PREFIX:
            return {"POST": self._create, "GET": self._list}.get(method)
        if not path.startswith(PREFIX + "/"):
            return None
        rest = path[len(PREFIX) + 1:].split("/")
        if len(rest) == 1:
            return {"GET": self._get, "DELETE": self._delete}.get(method)
        if len(rest) == 2 and (method, rest[1]) in (("POST", "cancel"), ("GET", "results")):
            return self._cancel if rest[1] == "cancel" else self._results
        return None

    def _batch(self, request: Any) -> dict[str, Any]:
        batch_id = request.path[len(PREFIX) + 1:].split("/")[0]
        batch = self.batches.get(batch_id)
        if batch is None:
            raise RequestRejected(404, f"message_batch_id: {batch_id} not found", "not_found_error")
        return batch

    async def _create(self, conn: Any, request: Any, version: str) -> None:
        requests = (request.body or {}).get("requests")
        if not isinstance(requests, list) or not requests:
            raise RequestRejected(400, "requests: Field required")
        batch_id = new_id("msgbatch_")
        results = []
        for i, item in enumerate(requests):
            if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
                raise RequestRejected(400, f"requests.{i}.custom_id: Field required")
            results.append({"custom_id": item["custom_id"], "result": self._answer(item.get("params"), version)})
        succeeded = sum(r["result"]["type"] == "succeeded" for r in results)
        batch = {"id": batch_id, "type": "message_batch", "processing_status": "ended",
                 "request_counts": {"processing": 0, "succeeded": succeeded, "errored": len(results) - succeeded,
                                    "canceled": 0, "expired": 0},
                 "created_at": _now(), "expires_at": _now(86400), "ended_at": _now(), "archived_at": None,
                 "cancel_initiated_at": None, "results_url": f"{self.mock.base_url}{PREFIX}/{batch_id}/results"}
        self.batches[batch_id] = batch
        self.results[batch_id] = results
        await conn.send_json(request, 200, batch)

    def _answer(self, params: Any, version: str) -> dict[str, Any]:
        try:
            validate_request(params, version, needs_max_tokens=True, signature_key=None)
            if isinstance(params, dict) and params.get("stream"):
                raise RequestRejected(400, "stream: batch requests cannot stream")
        except RequestRejected as rej:
            return {"type": "errored", "error": error_body(rej.status, new_id("req_"), rej.error_type, rej.message)}
        reply = plan_reply(params, self.mock.cache, self.mock.api_key)
        message = message_json(reply, params["model"])
        message["usage"]["service_tier"] = "batch"
        return {"type": "succeeded", "message": message}

    async def _list(self, conn: Any, request: Any, version: str) -> None:
        params = request.params
        newest_first = list(reversed(self.batches.values()))
        ids = [b["id"] for b in newest_first]
        limit = int(params.get("limit") or 20)
        if params.get("after_id") in ids:
            window = newest_first[ids.index(params["after_id"]) + 1:]
            page = window[:limit]
        elif params.get("before_id") in ids:
            window = newest_first[:ids.index(params["before_id"])]
            page = window[-limit:]
        else:
            window = newest_first
            page = window[:limit]
        await conn.send_json(request, 200, {"data": page, "has_more": len(window) > limit,
                                            "first_id": page[0]["id"] if page else None,
                                            "last_id": page[-1]["id"] if page else None})

    async def _get(self, conn: Any, request: Any, version: str) -> None:
        await conn.send_json(request, 200, self._batch(request))

    async def _cancel(self, conn: Any, request: Any, version: str) -> None:
        batch = self._batch(request)
        if batch["processing_status"] == "in_progress":
            batch.update(processing_status="canceling", cancel_initiated_at=_now())
        await conn.send_json(request, 200, batch)

    async def _delete(self, conn: Any, request: Any, version: str) -> None:
        batch = self._batch(request)
        if batch["processing_status"] != "ended":
            raise RequestRejected(400, "a batch can be deleted only once processing has ended")
        del self.batches[batch["id"]]
        await conn.send_json(request, 200, {"id": batch["id"], "type": "message_batch_deleted"})

    async def _results(self, conn: Any, request: Any, version: str) -> None:
        batch = self._batch(request)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.results[batch["id"]])
        await conn.send_raw(request, 200, "application/binary", lines.encode("utf-8"))
