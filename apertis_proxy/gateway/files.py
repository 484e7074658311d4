"""/v1/files, scoped to the key that uploaded each file (see owned_endpoint.py).

An upload goes to the first channel the router offers (failing over while no
answer comes or the answer is transient) and is recorded with its account; a
Messages request naming the file then goes only to that account.  Uploads are
held to the server's body limit (`max_body_bytes`).

The list pages as SDK 2.x pages it (`page` sends back an answer's `next_page`;
`ids` names the files of one page; `scope_id` keeps the files of one scope)
and as SDK 1.x does (`after_id`, `before_id`).
"""
from __future__ import annotations

from typing import Callable, Optional

import orjson

from ..errors import GatewayError
from ..http.request import Request
from ..http.responder import Responder
from ..plugin_api import Caller, UsageRecord
from .forward import request_info
from .owned_endpoint import OwnedEndpoint, list_page, with_query
from .ownership import FILE
from .paging import Params, cursor_walk, last, next_page, query_params
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

    async def list_owned(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord) -> None:
        params = query_params(req.query)
        how = cursor_walk(await self.owned_ids(caller), params, self.noun)
        data, following = await self.take(req, resp, caller, record, how, in_scope(params))
        listed = list_page(data, following)
        # `next_page` continues forwards; a page walked back from before_id (SDK 1.x) is continued by its first_id.
        listed["next_page"] = next_page(following) if following is not None and not how.backwards else None
        self.send_list(resp, record, listed)

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


def in_scope(params: Params) -> Optional[Callable[[dict], bool]]:
    """With `scope_id`: whether a file's metadata has that scope (`scope.id`, e.g. a session's id)."""
    scope_id = last(params, "scope_id")
    if scope_id is None:
        return None
    return lambda file: isinstance(file.get("scope"), dict) and file["scope"].get("id") == scope_id
