"""/v1/files, scoped to the key that uploaded each file (see owned_endpoint.py).

An upload goes to the first channel the router offers (failing over while no
answer comes or the answer is transient) and is recorded with its account; a
Messages request naming the file then goes only to that account.  Uploads are
held to the server's body limit (`max_body_bytes`).
"""
from __future__ import annotations

from typing import Optional

import orjson

from ..errors import GatewayError
from ..http.request import Request
from ..http.responder import Responder
from ..plugin_api import Caller, UsageRecord
from .forward import request_info
from .owned_endpoint import OwnedEndpoint, with_query
from .ownership import FILE
from .upstream_call import Answer
from .upstream_errors import fails_over, read_error

PREFIX = "/v1/files"


class FilesEndpoint(OwnedEndpoint):
    prefix = PREFIX
    kind = FILE
    noun = "file_id"

    async def item(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord,
                   rest: list[str]) -> None:
        method = req.method
        if (len(rest) == 1 and method in ("GET", "DELETE")) or (rest[1:] == ["content"] and method == "GET"):
            return self.send_answer(resp, await self.forward_item(req, resp, caller, record, rest[0]), record)
        raise GatewayError(404, f"Not found: {method} {req.path}", "not_found_error")

    async def create(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord) -> None:
        last: Optional[Answer] = None
        for channel in await self.fw.plugins.route(request_info(req, resp, None), caller) or []:
            last = await self.call(channel, "POST", with_query(PREFIX, req), req, req.body, record)
            if last is None:
                continue
            if last.status == 200:
                self.remember(orjson.loads(last.body)["id"], caller, channel)
                break
            if not fails_over(read_error(last.status, last.body, [channel.api_key]).cause):
                break
        self.send_answer(resp, last, record)
