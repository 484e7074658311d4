"""POST /v1/messages (and count_tokens): auth -> contract -> route -> attempt channels -> meter.

Failover happens only while nothing has reached the client: once the first
byte went out, an upstream failure becomes an in-band `event: error` (the SDKs
never retry a started body).  Every request that passed authentication is
metered exactly once, in `finally`, also when the client or upstream vanished.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Mapping, Optional, Sequence

import orjson

from ..errors import GatewayError, error_body
from ..http.request import Request
from ..http.responder import Responder
from ..plugin_api import (CAUSE_CREDENTIAL, CAUSE_TRANSIENT, MESSAGES_ENDPOINT, Caller, Channel, Outcome,
                          RequestInfo, UsageRecord, stopped_attempt)
from ..plugin_host import PluginHost
from ..settings import Settings
from ..store.catalog import Catalog
from ..store.owned_state import OwnedState
from ..upstream.connection import ResponseHead, UpstreamConnection, UpstreamError
from ..upstream.pool import Pools
from . import contract, exact_json, model_policy
from .body_encoding import decode_body
from .cors import Cors
from .headers import RETRY_ADVICE, downstream_headers, parse_retry_after, upstream_headers, upstream_request_id
from .ownership import (CONTAINER, CREDIT, MESSAGE, THINKING, THREAD, StateCapture, may_think, not_found,
                        owner_of, references, resolve, wants_diagnosis)
from .relay import EncodedRelay, JsonRelay, Relay, StreamRelay
from .sse import SseSplicer
from .pricing import price
from .upstream_errors import fails_over, read_error, request_secrets
from .usage import UsageMeter

log = logging.getLogger("apertis_proxy.gateway")

_JSON = (b"content-type", b"application/json")
_ERROR_BODY_LIMIT = 1024 * 1024
# Request timings for the ledger: uvloop's loop.time() ticks in whole milliseconds.
_clock = time.perf_counter


class CatalogRef:
    """The current price/alias catalogue; swapped whole when the store changes."""

    __slots__ = ("catalog",)

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def rules_of(self, model: str) -> Optional[Mapping[str, Any]]:
        """The catalogue's request rules for a model id; None when it has no entry."""
        entry = self.catalog.lookup(model)
        return entry.rules if entry is not None else None


def parse_body(raw: bytes) -> tuple[Any, Optional[str]]:
    if not raw:
        return None, "request body is empty; expected a JSON object"
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError as exc:
        return None, f"request body is not valid JSON: {exc}"


def request_info(req: Request, resp: Responder, body: Any,
                 headers: Optional[dict[str, str]] = None) -> RequestInfo:
    """The request as plugins see it; `headers`: req.header_map() when the caller has it already."""
    model = stream = None
    if isinstance(body, dict):
        m = body.get("model")
        model = m if isinstance(m, str) else None
        stream = body.get("stream") is True
    if headers is None:
        headers = req.header_map()
    return RequestInfo(method=req.method, path=req.path, query=req.query, headers=headers,
                       body=body if isinstance(body, dict) else None, model=model, stream=bool(stream),
                       client=req.client, request_id=resp.request_id, body_bytes=len(req.body or b""))


def _client_version(req: Request, header_map: Mapping[str, str]) -> Optional[str]:
    """The client's last anthropic-version header.  The map holds a single header's value as it is; a comma
    there may be two headers joined, and then the headers themselves are read."""
    version = header_map.get("anthropic-version")
    if version is not None and "," in version:
        for name, value in req.headers:
            if name == b"anthropic-version":
                version = value.decode("latin-1")
    return version


class FailedAttempt:
    """The failure of one channel attempt, kept to answer the client if all fail."""

    __slots__ = ("status", "error_type", "message", "headers", "body", "cause")

    def __init__(self, status: int, error_type: str, message: str,
                 headers: Optional[list] = None, body: Optional[bytes] = None,
                 cause: str = CAUSE_TRANSIENT) -> None:
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or []
        self.body = body
        self.cause = cause      # whether the next channel may be tried (upstream_errors.fails_over)


class Forwarding:
    """One request on its way through the channels: what each attempt needs."""

    __slots__ = ("req", "resp", "info", "record", "count_tokens", "owner", "notices", "client_version")

    def __init__(self, req: Request, resp: Responder, info: RequestInfo, record: UsageRecord, count_tokens: bool,
                 owner: str, notices: Sequence[tuple[bytes, bytes]], client_version: Optional[str]) -> None:
        self.req = req
        self.resp = resp
        self.info = info
        self.record = record
        self.count_tokens = count_tokens
        self.owner = owner              # whose account-bound state an answer creates
        self.notices = notices          # response headers about the model's resolution
        self.client_version = client_version    # the client's anthropic-version header, if any


class MessagesForwarder:
    def __init__(self, settings: Settings, plugins: PluginHost, pools: Pools, catalog: CatalogRef,
                 owned: Optional[OwnedState] = None) -> None:
        self.settings = settings
        self.plugins = plugins
        self.pools = pools
        self.catalog = catalog
        self.owned = owned        # account-bound state and its owners; None: not tracked
        self.cors = Cors.configured(settings.cors_origins)     # None: CORS off

    async def handle(self, req: Request, resp: Responder, *, count_tokens: bool = False) -> None:
        t0 = _clock()
        record = UsageRecord(request_id=resp.request_id, started_at=time.time(), endpoint=req.path,
                             client=req.client)
        caller: Optional[Caller] = None
        vouched_by = None
        unadmitted = False      # a caller whose plugin admits (Caller.admits) and has not admitted this request
        # The answer's last bytes wait for the meters (the ledger's row is durable first).
        resp.hold_end()
        try:
            decode_error = None
            # The name -> value map plugins get, built once: what the request's own headers decide
            # (an encoded body, the client's API version) is looked up there first.
            header_map = req.header_map()
            origin = header_map.get("origin")
            if origin is not None and self.cors is not None:    # a browser page's request
                self.cors.mark(resp, origin)
            if "content-encoding" in header_map:
                try:
                    decoded = decode_body(req.body, req.headers, self.settings.max_body_bytes)
                    if decoded is not None:
                        req.body = decoded      # forwarded decoded: content-encoding is not sent upstream
                except GatewayError as e:
                    decode_error = e
            body, parse_error = parse_body(req.body) if decode_error is None else (None, None)
            info = request_info(req, resp, body, header_map)
            client_version = _client_version(req, header_map)      # before a plugin could touch the map
            caller, vouched_by = await self.plugins.authenticate(info)
            unadmitted = caller.admits
            record.key_id, record.key_name = caller.key_id, caller.key_name
            if decode_error is not None:
                raise decode_error
            if parse_error:
                raise GatewayError(400, parse_error)
            if count_tokens:
                contract.validate(body, thinking_budget_max=self.settings.thinking_budget_max,
                                  require_max_tokens=False)
            else:
                contract.validate(body, thinking_budget_max=self.settings.thinking_budget_max)
            record.requested_model = info.model
            record.stream = info.stream and not count_tokens
            if caller.models is not None:       # an allow-list holds the models tools and fallbacks name too
                model_policy.refuse_named_models(self.catalog.catalog, body, caller)
            # Retired models go to their successor or are refused here (model_policy.py).
            resolved = model_policy.resolve(self.catalog.catalog, info.model, record.started_at)
            # A client that leaves while a stream is still starting (Claude
            # Code's Esc) stops the upstream generation; a JSON answer is
            # awaited regardless so its usage is known exactly.
            resp.abandon_on_disconnect = record.stream
            refs = references(body, req.body) if self.owned is not None else []
            if refs:
                account = await resolve(self.owned, refs, caller)
                if account is not None:
                    info = dataclasses.replace(info, account=account)
            channels = await self.plugins.route(info, caller)
            if resolved.redirected or resolved.error:
                channels = model_policy.pinned(self.catalog.catalog, channels or (), info.model,
                                               record.started_at)
                if channels:
                    resolved = model_policy.Resolution(info.model)   # a channel alias decides
                elif resolved.error:
                    raise resolved.error
                else:
                    info, caller = self._redirect(req, info, caller, resolved.model)
                    channels = await self.plugins.route(info, caller)
            if channels and info.model and not contract.is_claude_model_name(info.model):
                # A channel serving "any model" has not opted into another vendor's name
                # ("gpt-4o"): only a channel naming it (an alias or a listed model) gets it.
                channels = [c for c in channels if info.model in c.aliases
                            or (c.models is not None and info.model in c.models)]
            if info.account is not None:
                # The state lives on one upstream account: only its channels can serve it.
                channels = [c for c in channels if c.account == info.account]
                if not channels:
                    raise not_found(*refs[0])
            if not channels:
                raise self._unserved(info.model or "", caller)
            if not count_tokens:
                channels = model_policy.admit_unpriced(self.catalog.catalog, channels, info.model, caller,
                                                       self.settings.allow_unpriced, record.started_at, body)
            if caller.admits:       # limits: only what goes upstream takes them
                try:
                    caller = await self.plugins.admit(vouched_by, info, caller)
                    unadmitted = False
                except GatewayError:
                    caller = None       # refused by the key's limits: as at the key check, not metered
                    raise
            await self._attempt_all(Forwarding(req, resp, info, record, count_tokens, owner_of(caller),
                                               resolved.headers, client_version), channels)
        except GatewayError as e:
            record.status = e.status
            record.error_type = e.error_type
            if not resp.started:
                headers = [(k.encode(), str(v).encode()) for k, v in e.headers.items()]
                if e.error_code:
                    resp.send(e.status, [_JSON] + headers,
                              error_body(e.error_type, e.message, resp.request_id, e.error_code))
                else:
                    resp.send_error(e.status, e.message, e.error_type, headers)
        except asyncio.CancelledError:
            # The client left (see abandon_on_disconnect) or shutdown cut the
            # request at its deadline (an answer already whole excepted); still metered below.
            if not resp.ended:
                record.interrupted = True
            if not resp.started:
                # Nothing was answered: the client left, or shutdown's deadline cut the request.
                record.status, record.error_type = ((499, "client_closed_request") if resp.client_gone
                                                    else (0, "gateway_stopped"))
            raise
        finally:
            record.duration_ms = round((_clock() - t0) * 1000, 3)
            if not record.status:
                record.status = resp.status
            # Metered before the answer ends (the ledger's row is durable first), and
            # before finish(): an auth plugin slow or hanging there holds back
            # neither the answer nor the row.
            try:
                if caller is not None:
                    if not count_tokens:
                        price(record, self.catalog.catalog)
                    await self.plugins.meter(record)
            finally:
                if caller is not None and not unadmitted:       # release() gives back what admit() took
                    await self.plugins.release(vouched_by, caller, record)
                resp.release()
            if caller is not None:
                await self.plugins.finish(vouched_by, caller, record)

    @staticmethod
    def _redirect(req: Request, info: RequestInfo, caller: Caller, model: str) -> tuple[RequestInfo, Caller]:
        """The request as sent to `model` instead; a key allowed the retired model may use it."""
        body = {**info.body, "model": model}
        req.body = exact_json.dumps(body, req.body)
        if caller.models is not None:
            caller = dataclasses.replace(caller, models=caller.models | {model})
        return dataclasses.replace(info, model=model, body=body), caller

    def _unserved(self, model: str, caller: Caller) -> GatewayError:
        if not contract.is_claude_model_name(model):
            return GatewayError(404, f"model: {model} is not available: this endpoint serves "
                                     f"Anthropic-type channels only (Claude models)", "not_found_error")
        names = sorted(m.id for m in self.plugins.models(caller))
        listed = ", ".join(names) if names else "none"
        return GatewayError(404, f"model: {model} is not served by any channel; "
                                 f"models this key can use: {listed}", "not_found_error")

    # -- attempts ------------------------------------------------------------
    async def _attempt_all(self, fwd: "Forwarding", channels: Sequence[Channel]) -> None:
        client_version = fwd.client_version
        failure: Optional[FailedAttempt] = None
        last = len(channels) - 1
        for i, channel in enumerate(channels):
            prepared = contract.prepare_for_channel(fwd.info.body, channel, client_version=client_version,
                                                    default_version=self.settings.default_api_version,
                                                    catalog_rules=self.catalog.rules_of)
            failure = await self._attempt(fwd, channel, prepared)
            if failure is None:
                return
            if not fails_over(failure.cause) or i == last:
                break
        assert failure is not None
        record, resp = fwd.record, fwd.resp
        record.status = failure.status
        record.error_type = failure.error_type
        if failure.body is not None:
            resp.send(failure.status, [_JSON] + failure.headers, failure.body)
        else:
            resp.send_error(failure.status, failure.message, failure.error_type, failure.headers)

    async def _attempt(self, fwd: "Forwarding", channel: Channel,
                       prepared: "contract.Prepared") -> Optional[FailedAttempt]:
        """One channel.  None when the client got its answer; a FailedAttempt when it failed
        before anything went out (the caller may try the next channel)."""
        req, info, record = fwd.req, fwd.info, fwd.record
        record.attempts += 1
        record.channel_id, record.channel_name = channel.id, channel.name
        record.upstream_request_id = None       # this attempt's, once it has an answer
        upstream_model = prepared.body.get("model") if isinstance(prepared.body, dict) else None
        record.upstream_model = upstream_model if isinstance(upstream_model, str) else None
        # What was checked is what goes: the parsed body, serialized again (~0.2 us for a small one), never the
        # client's bytes, in which a repeated key may name another model or another key's thread to a parser
        # that keeps the first where orjson keeps the last.
        payload = exact_json.dumps(prepared.body, req.body)
        try:
            origin = self.pools.origin(channel.base_url)
            headers = upstream_headers(req.headers, channel, origin.host_header, prepared.api_version,
                                       len(payload))
        except ValueError as exc:   # a bad base URL, or a key/version that cannot be a header
            self.report_attempt(record, Outcome(channel, ok=False, request_id=info.request_id,
                                          error_type="connect_error", message=str(exc), cause=CAUSE_TRANSIENT))
            return FailedAttempt(502, "api_error", "upstream channel is misconfigured")
        target = (origin.base_path + req.path + ("?" + req.query if req.query else "")).encode("latin-1")
        t_start = _clock()

        checkpoints = self.plugins.checkpoints and not fwd.count_tokens     # counting tokens is free

        def connected() -> None:
            record.reached_upstream = True
            if checkpoints:         # from here the upstream may bill it: noted before the bytes go out
                self.plugins.sent(record)

        head = None
        with self.pools.pool(origin).lease() as lease:
            try:
                try:
                    try:
                        head = await lease.send(b"POST", target, headers, payload, self.settings.read_timeout,
                                                connected)
                    finally:        # however the send ended (also cut by shutdown), before its own outcome
                        self._note_resent(record, channel, lease)
                except UpstreamError as exc:
                    return self._failed(record, channel, info, exc, t_start)
                # Sent and answered: a stream may run for minutes, so do not hold the
                # request bytes (an orjson output keeps an 8 KB block, measured).
                payload = headers = None    # noqa: F841
                record.ttfb_ms = round((_clock() - t_start) * 1000, 3)
                record.upstream_request_id = upstream_request_id(head.get(b"request-id"), channel.api_key)
                if head.status >= 400:
                    return await self._upstream_error(lease.conn, record, channel, info, head, t_start)
                relay, meter = self._relay(fwd, channel, prepared, lease.conn, head)
                await relay.run()
            except asyncio.CancelledError:
                if fwd.resp.ended and head is not None:
                    # The answer was whole before shutdown's deadline came (the upstream lingered): served.
                    self.report_attempt(record, Outcome(channel, ok=True, request_id=info.request_id,
                                                        status=head.status, duration=_clock() - t_start))
                elif not fwd.resp.client_gone and record.reached_upstream:
                    # Shutdown's deadline cut the attempt: listed as a crash lists it, no failure of its channel.
                    record.attempt_log.append(stopped_attempt(channel.name, channel.id,
                                                              head.status if head is not None else None,
                                                              record.upstream_request_id))
                raise
        # A body that failed after a 2xx head (an in-band error, a cut or stalled
        # stream) is the channel's failure too; a client that left is not.
        failed = record.error_type is not None and record.error_type != "client_closed_request"
        self.report_attempt(record, Outcome(channel, ok=not failed, request_id=info.request_id, status=head.status,
                                      error_type=record.error_type if failed else None,
                                      duration=_clock() - t_start, cause=CAUSE_TRANSIENT if failed else None,
                                      refused=failed and relay.upstream_refused))
        if isinstance(meter, StateCapture):
            named = self._remember(meter, info, channel, fwd.owner)
            if named is not None:
                # The next turn may name this answer and reach another worker, which reads the database:
                # the answer's end (held for the meters) waits for the write.
                await asyncio.shield(named)
        return None

    def _relay(self, fwd: "Forwarding", channel: Channel, prepared: "contract.Prepared",
               conn: UpstreamConnection, head: ResponseHead) -> tuple[Relay, UsageMeter]:
        """What moves a 2xx answer to the client, and the meter that takes its usage."""
        record = fwd.record
        down, encoding = downstream_headers(head.headers)
        if record.upstream_request_id:
            down.append((b"upstream-request-id", record.upstream_request_id.encode("latin-1")))
        down.extend(fwd.notices)
        if prepared.dropped:
            down.append((b"apertis-dropped-params", contract.dropped_header_value(prepared.dropped).encode()))
        rename = None
        # The response names the model the client asked for (an alias, or a retired model's old name).
        asked = record.requested_model
        if asked and record.upstream_model and asked != record.upstream_model:
            rename = (record.upstream_model, asked)
        ctype = head.get(b"content-type") or b""
        if self.owned is not None and not fwd.count_tokens:
            entry = self.catalog.catalog.lookup(record.upstream_model or record.requested_model)
            meter: UsageMeter = StateCapture(record, may_think(fwd.info.body, entry))
        else:
            meter = UsageMeter(record)
        timeout = self.settings.read_timeout
        if encoding is not None:
            return EncodedRelay(conn, fwd.resp, head.status, down, record, timeout, meter, rename, fwd.count_tokens,
                                encoding, decode=ctype[:16].lower() == b"application/json"), meter
        # Media types are case-insensitive (a JSON answer, the usual one, is told without lower-casing); an
        # answer to a stream request that names none is read as the stream the SDKs take it for.
        if not ctype.startswith(b"application/json") and (
                ctype[:17].lower() == b"text/event-stream" or (not ctype and record.stream)):
            if self.plugins.checkpoints:
                meter.on_usage = self._checkpoint
            return StreamRelay(conn, fwd.resp, head.status, down, record, timeout,
                               SseSplicer(meter, rename, channel.api_key)), meter
        return JsonRelay(conn, fwd.resp, head.status, down, record, timeout, meter, rename, fwd.count_tokens), meter

    def _checkpoint(self, record: UsageRecord) -> None:
        """A stream's usage as reported so far (at message_start, and a message_delta the stream did not end
        after in the same read), priced, to the meters that keep it in case the gateway dies before the stream
        ends (MeterPlugin.checkpoint).  The record itself, not a copy (one per stream costs more than the rest):
        its cost is priced again when the stream ends."""
        duration_ms = record.duration_ms
        record.duration_ms = round(max(0.0, time.time() - record.started_at) * 1000, 3)
        # The attempt serving the stream is logged when it ends; for a row that stands for a gateway that
        # died, it ended there.
        record.attempt_log.append(stopped_attempt(record.channel_name, record.channel_id, record.status,
                                                  record.upstream_request_id))
        price(record, self.catalog.catalog)
        try:
            self.plugins.checkpoint(record)
        finally:
            record.duration_ms = duration_ms
            record.attempt_log.pop()

    def _remember(self, created: StateCapture, info: RequestInfo, channel: Channel,
                  owner: str) -> Optional[asyncio.Task]:
        """Record the ids this answer created, with their account and owner.  Returns the write of the message
        id of an answer to a request asking for cache diagnosis (the next request may name it), if any."""
        owned = self.owned
        assert owned is not None
        thread = info.body.get("thread") if info.body is not None else None
        named = None
        if created.message_id:
            if isinstance(thread, dict):
                owned.remember(THREAD, created.message_id, owner, channel.account, channel.id)
            if wants_diagnosis(info.body, info.headers):
                named = owned.remember(MESSAGE, created.message_id, owner, channel.account, channel.id)
        if created.container_id:
            owned.remember(CONTAINER, created.container_id, owner, channel.account, channel.id)
        if created.credit_token:
            owned.remember(CREDIT, created.credit_token, owner, channel.account, channel.id)
        for fingerprint in created.signatures:
            owned.remember(THINKING, fingerprint, owner, channel.account, channel.id)
        return named

    def report_attempt(self, record: UsageRecord, outcome: Outcome) -> None:
        """One attempt's outcome: to the routers (health) and into the request's ledger row."""
        entry = {"channel": outcome.channel.name, "channel_id": outcome.channel.id, "outcome": outcome.kind,
                 "status": outcome.status, "error_type": outcome.error_type,
                 "upstream_request_id": record.upstream_request_id}
        if outcome.unanswered:
            entry["unanswered"] = True
        elif outcome.refused:
            entry["refused"] = True
        record.attempt_log.append(entry)
        # A channel's health follows its Messages answers: the API limits counting tokens, files and batches
        # apart, so their rate limits and overloads (and their successes) say nothing of it; their refused
        # credentials, exhausted accounts and broken connections do.
        self.plugins.feedback(outcome, record.endpoint == MESSAGES_ENDPOINT
                              or (not outcome.ok and outcome.status not in (429, 529)))

    @staticmethod
    def _note_resent(record: UsageRecord, channel: Channel, lease: Any) -> None:
        """A first send on a reused connection that failed before any answer, the request then sent again on a
        fresh one (upstream/pool.py): listed, as the upstream may have read it; no failure of its channel."""
        if lease.resent is not None:       # one channel tried (`attempts`), two sends listed
            record.attempt_log.append({"channel": channel.name, "channel_id": channel.id, "outcome": "resent",
                                       "status": None, "error_type": None, "upstream_request_id": None,
                                       "unanswered": True})

    def _failed(self, record: UsageRecord, channel: Channel, info: RequestInfo, exc: UpstreamError,
                t_start: float) -> FailedAttempt:
        etype = "timeout" if exc.timeout else "connect_error"
        self.report_attempt(record, Outcome(channel, ok=False, request_id=info.request_id, error_type=etype,
                                      message=str(exc), duration=_clock() - t_start, cause=CAUSE_TRANSIENT,
                                      unanswered=exc.timeout and exc.phase != "connect"))
        if exc.timeout:
            return FailedAttempt(504, "timeout_error", f"upstream timed out: {exc}")
        return FailedAttempt(502, "api_error", f"upstream unavailable: {exc}")

    async def _upstream_error(self, conn: UpstreamConnection, record: UsageRecord, channel: Channel,
                              info: RequestInfo, head: ResponseHead, t_start: float) -> FailedAttempt:
        try:
            raw = await conn.read_all(self.settings.read_timeout, _ERROR_BODY_LIMIT)
        except UpstreamError:
            raw = b""
        # The client gets the upstream's body (its error_code and request_id), without
        # the channel's key: some relays quote the credential they were sent.
        error = read_error(head.status, raw, [channel.api_key, *request_secrets(info.body)])
        retry_after = parse_retry_after(head.get(b"retry-after"))
        self.report_attempt(record, Outcome(channel, ok=False, request_id=info.request_id, status=error.status,
                                      error_type=error.error_type, message=error.message,
                                      retry_after=retry_after, duration=_clock() - t_start,
                                      error_code=error.error_code, cause=error.cause))
        if error.cause == CAUSE_CREDENTIAL:
            # The channel's own key was refused: the caller's key is fine, so do
            # not hand them an authentication error they cannot fix.
            return FailedAttempt(502, "api_error", "the upstream channel rejected the gateway's credentials",
                           cause=error.cause)
        passed = [(n, v) for n, v in head.headers if n in RETRY_ADVICE]
        if record.upstream_request_id:
            passed.append((b"upstream-request-id", record.upstream_request_id.encode("latin-1")))
        return FailedAttempt(error.status, error.error_type, error.message, passed, error.body, error.cause)
