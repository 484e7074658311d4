"""What the endpoints for account-bound resources (batches, files) share.

Each request is authenticated, finished and metered once like a Messages
request, its body decoded like one (`Content-Encoding`, body_encoding.py).
A resource id is served only to the key that created it, from the account
that holds it (owned_state); any other id is a 404 that never goes upstream.
Lists show the caller's own resources only, newest first, each fetched from
its account.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import orjson

from ..errors import GatewayError, error_body
from ..http.request import Request
from ..http.responder import Responder
from ..plugin_api import CAUSE_TRANSIENT, Caller, Channel, Outcome, UsageRecord
from ..upstream.connection import UpstreamError
from . import contract
from .body_encoding import decode_body
from .headers import RETRY_ADVICE, parse_retry_after, upstream_request_id
from .forward import request_info
from .ownership import owner_of
from .paging import Walk, query_params, walk
from .upstream_call import Answer, call
from .upstream_errors import read_error

_JSON = (b"content-type", b"application/json")
log = logging.getLogger(__name__)


class OwnedEndpoint:
    prefix = ""          # "/v1/files"
    kind = ""            # the owned_state kind
    noun = ""            # for messages: "file"

    def __init__(self, forwarder: Any) -> None:
        self.fw = forwarder          # MessagesForwarder: settings, plugins, pools, catalog, owned

    def serves(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def handle(self, req: Request, resp: Responder) -> None:
        fw = self.fw
        record = UsageRecord(request_id=resp.request_id, started_at=time.time(), endpoint=self.prefix,
                             client=req.client)
        t0 = time.perf_counter()
        info = request_info(req, resp, None)
        try:
            caller, vouched_by = await fw.plugins.authenticate(info)
        except GatewayError as e:
            return send_error(resp, e)
        record.key_id, record.key_name = caller.key_id, caller.key_name
        refused = self.refusal(req, caller)
        if refused is None and caller.admits:
            try:
                caller = await fw.plugins.admit(vouched_by, info, caller)
            except GatewayError as e:
                return send_error(resp, e)      # refused by the key's limits: as at the key check, not metered
        resp.hold_end()     # the answer's last bytes wait for the meters (see Responder.hold_end)
        try:
            if refused is not None:
                raise refused
            decoded = decode_body(req.body, req.headers, fw.settings.max_body_bytes)
            if decoded is not None:
                req.body = decoded      # forwarded decoded: content-encoding is not sent upstream
            rest = req.path[len(self.prefix):].strip("/")
            await self.dispatch(req, resp, caller, record, rest.split("/") if rest else [])
        except GatewayError as e:
            record.status, record.error_type = e.status, e.error_type
            if not resp.started:
                send_error(resp, e)
        finally:
            record.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
            record.status = record.status or resp.status
            try:
                await fw.plugins.meter(record)      # before the answer ends and before finish(), as in forward.py
            finally:
                try:
                    if refused is None or not caller.admits:     # release() gives back what admit() took
                        await fw.plugins.release(vouched_by, caller, record)
                finally:
                    resp.release()
            await fw.plugins.finish(vouched_by, caller, record)

    def refusal(self, req: Request, caller: Caller) -> Optional[GatewayError]:
        """What the endpoint refuses this caller before the key's limits admit the request (it then takes no
        place in them), answered and metered like any later refusal; None: nothing."""
        return None

    async def dispatch(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord,
                       rest: list[str]) -> None:
        if rest:
            return await self.item(req, resp, caller, record, rest)
        if req.method == "POST":
            return await self.create(req, resp, caller, record)
        if req.method == "GET":
            return await self.list_owned(req, resp, caller, record)
        raise not_allowed("GET, POST")

    async def create(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord) -> None:
        raise NotImplementedError

    async def item(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord,
                   rest: list[str]) -> None:
        """A request on one resource: `rest` is its id and what follows it in the path."""
        raise NotImplementedError

    def shown(self, req: Request, resource: dict) -> dict:
        """A resource as the client sees it."""
        return resource

    # -- ownership ------------------------------------------------------------

    def not_found(self, ident: str) -> GatewayError:
        return GatewayError(404, f"{self.noun}: {ident} not found", "not_found_error")

    async def owned_channel(self, req: Request, resp: Responder, caller: Caller, ident: str) -> Channel:
        """A channel of the account holding `ident`; 404 unless the caller created it."""
        found = (await self.fw.owned.find([(self.kind, ident)])).get((self.kind, ident))
        if found is None or found.owner != owner_of(caller):
            raise self.not_found(ident)
        info = dataclasses.replace(request_info(req, resp, None), model=None, account=found.account)
        channels = [c for c in await self.fw.plugins.route(info, caller) or [] if c.account == found.account]
        if not channels:
            raise NoChannel(f"{self.noun}: {ident} not found: no enabled channel serves the upstream "
                            f"account holding it", found.account)
        return channels[0]

    async def forward_item(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord,
                           ident: str) -> Optional[Answer]:
        """The request as it came, on the account holding `ident`; a deletion is forgotten."""
        channel = await self.owned_channel(req, resp, caller, ident)
        answer = await self.call(channel, req.method, with_query(req.path, req), req, b"", record)
        if answer is not None and answer.status == 200 and req.method == "DELETE":
            self.fw.owned.forget(self.kind, ident)
        return answer

    def remember(self, ident: str, caller: Caller, channel: Channel) -> None:
        self.fw.owned.remember(self.kind, ident, owner_of(caller), channel.account, channel.id)

    # -- lists ----------------------------------------------------------------

    async def list_owned(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord) -> None:
        """The caller's own resources, paged like the API's lists, each as its account shows it."""
        how = walk(await self.owned_ids(caller), query_params(req.query), self.noun)
        data, following = await self.take(req, resp, caller, record, how)
        self.send_list(resp, record, list_page(data, following))

    async def owned_ids(self, caller: Caller) -> list[str]:
        """The ids of the caller's own resources, newest first."""
        return [ident for ident, _ in await self.fw.owned.owned_by(self.kind, owner_of(caller))]

    async def take(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord, how: Walk,
                   keep: Optional[Callable[[dict], bool]] = None) -> tuple[list[dict], Optional[str]]:
        """The page along the walk: up to `how.limit` resources (those `keep` keeps, in list order) and the
        id of the next one the walk would take (None: the walk ends).  One that cannot be fetched is left
        out.  With `keep`, the next one must be fetched to know it is kept."""
        data: list[dict] = []
        unserved: set[str] = set()
        following = None
        for ident in how.ids:
            if len(data) == how.limit and keep is None:
                following = ident
                break
            shown = await self.fetch_shown(req, resp, caller, record, ident, unserved)
            if shown is None or (keep is not None and not keep(shown)):
                continue
            if len(data) == how.limit:
                following = ident
                break
            data.append(shown)
        if unserved:
            log.warning("%s list left out the items of account(s) %s: no enabled channel serves them",
                        self.prefix, ", ".join(sorted(unserved)))
        if how.backwards:
            data.reverse()
        return data, following

    async def fetch_shown(self, req: Request, resp: Responder, caller: Caller, record: UsageRecord, ident: str,
                          unserved: set[str]) -> Optional[dict]:
        """The resource as its account shows it; None when it is gone there (404) or no enabled channel serves
        its account (added to `unserved`).  Any other failure fails the list, with the upstream's answer and its
        retry advice: a list that left the item out would tell the client it is gone."""
        try:
            channel = await self.owned_channel(req, resp, caller, ident)
        except NoChannel as e:
            unserved.add(e.account)
            return None
        answer = await self.call(channel, "GET", f"{self.prefix}/{ident}", req, b"", record)
        if answer is not None and answer.status == 200:
            return self.shown(req, orjson.loads(answer.body))
        if answer is not None and answer.status == 404:
            return None
        self.send_answer(resp, answer, record)      # 502 when no answer came
        raise GatewayError(answer.status, "upstream failed while listing", record.error_type or "api_error")

    @staticmethod
    def send_list(resp: Responder, record: UsageRecord, listed: dict) -> None:
        record.status = 200
        resp.send(200, [_JSON], orjson.dumps(listed))

    # -- upstream -------------------------------------------------------------

    async def call(self, channel: Channel, method: str, target: str, req: Request, body: bytes,
                   record: UsageRecord, version: Optional[str] = None, *, billed: bool = False) -> Optional[Answer]:
        """One call on the channel (None: no answer came); an error answer is redacted.  Its
        outcome goes to the router and the metrics like a Messages attempt's.  A `billed` call
        (one the upstream may bill) is noted to the meters before it goes out (MeterPlugin.sent)."""
        fw = self.fw
        record.channel_id, record.channel_name = channel.id, channel.name
        record.attempts += 1
        record.upstream_request_id = None       # this call's, once it has an answer
        if version is None:
            version = contract.upstream_api_version(channel, header(req, b"anthropic-version"),
                                                    fw.settings.default_api_version)
        t_start = time.perf_counter()
        try:
            answer = await call(fw.pools, channel, method, target, req.headers, body,
                                read_timeout=fw.settings.read_timeout, api_version=version,
                                connected=(lambda: fw.plugins.sent(record)) if billed and fw.plugins.checkpoints
                                else None)
        except (UpstreamError, ValueError) as exc:
            timeout = isinstance(exc, UpstreamError) and exc.timeout
            fw.report_attempt(record, Outcome(channel, ok=False, request_id=record.request_id,
                                        error_type="timeout" if timeout else "connect_error", message=str(exc),
                                        duration=time.perf_counter() - t_start, cause=CAUSE_TRANSIENT,
                                        unanswered=timeout and exc.phase != "connect"))
            return None
        record.reached_upstream = True
        record.upstream_request_id = upstream_request_id(answer.get(b"request-id"), channel.api_key)
        duration = time.perf_counter() - t_start
        if answer.status >= 400:
            error = read_error(answer.status, answer.body, [channel.api_key])
            answer.body = error.body
            record.error_type = error.error_type
            fw.report_attempt(record, Outcome(channel, ok=False, request_id=record.request_id, status=error.status,
                                        error_type=error.error_type, message=error.message,
                                        retry_after=parse_retry_after(answer.get(b"retry-after")),
                                        duration=duration, error_code=error.error_code, cause=error.cause))
        else:
            fw.report_attempt(record, Outcome(channel, ok=True, request_id=record.request_id, status=answer.status,
                                        duration=duration))
        record.status = answer.status
        return answer

    @staticmethod
    def send_answer(resp: Responder, answer: Optional[Answer], record: UsageRecord) -> None:
        if answer is None:
            raise GatewayError(502, "upstream unavailable", "api_error")
        resp.send(answer.status, passed_down(answer, record, _PASSED), answer.body)


# What an answer passes down: its type (a file's content also its name) and the upstream's retry advice.
_PASSED = (b"content-type", b"content-disposition", *RETRY_ADVICE)


def passed_down(answer: Answer, record: UsageRecord, names: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """The answer's headers of `names` (JSON's content type when it has none) and the upstream's request id."""
    passed = [(n, v) for n, v in answer.headers if n in names]
    if not any(n == b"content-type" for n, _ in passed):
        passed.append(_JSON)
    if record.upstream_request_id:
        passed.append((b"upstream-request-id", record.upstream_request_id.encode("latin-1")))
    return passed


def with_query(path: str, req: Request) -> str:
    """`path` with the client's query string (`?beta=true` of the SDKs' beta calls): a call that mirrors the
    client's goes upstream as the client made it."""
    return f"{path}?{req.query}" if req.query else path


class NoChannel(GatewayError):
    """No enabled channel of the account holding an item: the item cannot be reached, so
    it is answered as not found (a list leaves it out)."""

    def __init__(self, message: str, account: str) -> None:
        super().__init__(404, message, "not_found_error")
        self.account = account


def list_page(data: list[dict], following: Optional[str]) -> dict:
    """A list answer: data, has_more (a `following` id exists), first_id, last_id."""
    return {"data": data, "has_more": following is not None,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def header(req: Request, name: bytes) -> Optional[str]:
    value = req.header(name)
    return value.decode("latin-1") if value is not None else None


def not_allowed(allowed: str) -> GatewayError:
    return GatewayError(405, f"method not allowed; use {allowed}", "invalid_request_error", {"allow": allowed})


def send_error(resp: Responder, e: GatewayError) -> None:
    headers = [(k.encode(), str(v).encode()) for k, v in e.headers.items()]
    if e.error_code:
        resp.send(e.status, [_JSON] + headers, error_body(e.error_type, e.message, resp.request_id, e.error_code))
    else:
        resp.send_error(e.status, e.message, e.error_type, headers)
