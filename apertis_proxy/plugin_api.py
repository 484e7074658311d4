"""The whole plugin contract of apertis-proxy, in one module.

A plugin is any object built by a factory registered under one of three
entry-point groups:

    apertis_proxy.auth    -> AuthPlugin     who is calling? (or reject)
    apertis_proxy.router  -> RouterPlugin   which channels, in which order?
    apertis_proxy.meter   -> MeterPlugin    one UsageRecord per finished request

The factory is called once per worker process as ``factory(ctx)`` with a
:class:`PluginContext`; a class whose ``__init__`` takes ``ctx`` is the usual
factory.  Every plugin may define ``async start()`` (called before the server
accepts connections) and ``async close()`` (called at shutdown, after the last
request finished; meters flush here).

Plugins see only the types defined here: request facts, callers, channels,
outcomes and usage records.  They never see sockets, h11 state or the
server's objects.  A plugin that raises anything but :class:`Reject` is
contained: the error is logged and the request is answered 500 ``api_error``
(auth, router) or the record is skipped for that meter; the server stays up.

Chains (configured in the ``[plugins]`` table, see docs/plugins.md):
    auth:   plugins run in order; the first non-None Caller wins; ``Reject``
            ends the request with that error; all None -> 401.
    router: plugins run in order; the first non-None list wins (an empty list
            means "no channel serves this model" -> 404).
    meter:  every meter receives every record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

__all__ = [
    "AUTH_GROUP", "ROUTER_GROUP", "METER_GROUP",
    "PluginContext", "RequestInfo", "Caller", "Channel", "ModelInfo",
    "Outcome", "UsageRecord", "Reject",
    "AuthPlugin", "RouterPlugin", "MeterPlugin",
    "CAUSE_REQUEST", "CAUSE_CREDENTIAL", "CAUSE_EXHAUSTED", "CAUSE_TRANSIENT",
    "SEPARATE_ITERATIONS", "TOKEN_COUNTS",
]

AUTH_GROUP = "apertis_proxy.auth"
ROUTER_GROUP = "apertis_proxy.router"
METER_GROUP = "apertis_proxy.meter"


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin factory receives."""

    name: str                      # the entry-point name the plugin was loaded under
    options: Mapping[str, Any]     # the plugin's table from the config file (may be empty)
    db_path: str                   # the --db value: a SQLite path or a database URL (prefer `store`)
    log: logging.Logger            # a logger named after the plugin
    worker: int = 0                # 0..workers-1; plugins with in-memory limits may scale by it
    workers: int = 1
    meters: tuple[str, ...] = ()   # the meter plugins this gateway runs ("sqlite": keys' spend is settled by it)
    # The gateway's store (apertis_proxy.store.service.Store): the shared configuration
    # snapshot (store.watcher().snapshot / .subscribe) and named operations.  None when a
    # plugin is built outside a gateway (tests); such a plugin may open_store(db_path).
    store: Any = None


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Facts about one client request, read-only."""

    method: str
    path: str                      # without the query string, e.g. "/v1/messages"
    query: str                     # raw query string without "?", "" if none
    headers: Mapping[str, str]     # lower-cased names; repeated headers joined with ", "
    body: Optional[Mapping[str, Any]]  # parsed JSON body (None for GET); do not mutate
    model: Optional[str]           # the model name the client asked for
    stream: bool
    client: str                    # "ip:port" of the peer
    request_id: str                # the gateway's request id (also in the response header)
    # The upstream account (Channel.account) holding state this request refers to
    # (a thread, a container, files): only channels of that account can serve it.
    account: Optional[str] = None
    body_bytes: int = 0            # the request body's size as received (decoded)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, as decided by an auth plugin."""

    key_id: Optional[int]
    key_name: str
    models: Optional[frozenset[str]] = None   # allowed model names; None = any
    data: Mapping[str, Any] = field(default_factory=dict)  # plugin-private extras
    cost_limited: bool = False     # spend is limited in USD: requests that cannot be priced are refused
    token_limited: bool = False    # spend is limited in tokens
    admits: bool = False           # the plugin's admit() runs for this caller's requests (a key with limits)

    def may_use(self, model: str, aliases: Sequence[str] = ()) -> bool:
        if self.models is None:
            return True
        return model in self.models or any(a in self.models for a in aliases)


# The anthropic-version sent upstream when neither the channel nor the
# gateway's settings name another.
DEFAULT_API_VERSION = "2023-06-01"
MESSAGES_ENDPOINT = "/v1/messages"     # UsageRecord.endpoint of a Messages request


@dataclass(frozen=True, slots=True)
class Channel:
    """One upstream endpoint that speaks the Anthropic Messages API."""

    id: int
    name: str
    base_url: str                          # e.g. "https://api.anthropic.com"
    api_key: str = field(repr=False)       # never logged, never shown
    type: str = "anthropic"
    models: Optional[frozenset[str]] = None    # client-facing names served; None = any
    aliases: Mapping[str, str] = field(default_factory=dict)  # client name -> upstream id
    priority: int = 0                      # higher tier is tried first
    weight: int = 1                        # weighted choice inside a tier
    api_version: str = DEFAULT_API_VERSION     # anthropic-version sent upstream
    forward_client_version: bool = False   # send the client's anthropic-version instead
    forward_extras: bool = False           # forward OpenAI-style extras unchanged
    auth_header: str = "x-api-key"         # or "authorization" (sent as Bearer)
    options: Mapping[str, Any] = field(default_factory=dict)

    def upstream_model(self, model: str) -> str:
        return self.aliases.get(model, model)

    @property
    def account(self) -> str:
        """Which upstream account this channel uses: channels sharing a base URL and
        key share threads, containers and files.  A fingerprint, not the key."""
        return hashlib.sha256(f"{self.base_url}\0{self.api_key}".encode()).hexdigest()[:24]

    def serves(self, model: str) -> bool:
        """Whether this channel takes `model`: any model when `models` is None;
        else a listed name, a name whose alias is listed, or another name of a
        listed model (listing "claude-sonnet-4.5" serves the dated id too)."""
        if self.models is None:
            return True
        aliases = self.aliases
        upstream = aliases.get(model, model)
        if model in self.models or upstream in self.models:
            return True
        return any(aliases.get(name, name) == upstream for name in self.models)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """An entry of GET /v1/models."""

    id: str
    display_name: str
    created_at: str                # RFC 3339
    lifecycle: str = "active"      # active, deprecated or retired
    deprecated_at: Optional[str] = None    # RFC 3339
    retires_at: Optional[str] = None       # RFC 3339
    line: Optional[str] = None             # opus, sonnet, haiku, fable, mythos
    max_input_tokens: Optional[int] = None
    max_tokens: Optional[int] = None
    capabilities: Optional[Mapping[str, Any]] = None


# Why an attempt failed (Outcome.cause), decided by the gateway from the upstream's answer.
CAUSE_REQUEST = "request"          # the request was at fault: not the channel's failure
CAUSE_CREDENTIAL = "credential"    # the channel's own key was refused (401; a 403 saying so)
CAUSE_EXHAUSTED = "exhausted"      # the account hit a spend or ramp limit (402, some 429s): hours, not seconds
CAUSE_TRANSIENT = "transient"      # 429, 5xx, 529, timeouts, connect errors, a body that failed mid-way


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened on one attempt against one channel (router feedback)."""

    channel: Channel
    ok: bool                       # upstream answered 2xx and delivered the whole body
    request_id: str = ""           # the gateway request this attempt belongs to
    status: Optional[int] = None   # upstream HTTP status, None when no response came
    error_type: Optional[str] = None   # Anthropic error type, or "connect_error" / "timeout"
    message: str = ""              # upstream error message (never contains the key)
    retry_after: Optional[float] = None  # seconds, from upstream retry-after
    duration: float = 0.0          # seconds spent on this attempt
    error_code: Optional[str] = None   # upstream `error.details.error_code`, e.g. "ramp_limit_exceeded"
    cause: Optional[str] = None    # one of the CAUSE_* values when ok is False
    unanswered: bool = False       # the request went out and no answer came (read_timeout): it may be billed
    refused: bool = False          # a 2xx whose body was the upstream's own error (a stream's `event: error`)

    @property
    def kind(self) -> str:
        """What happened, in one word: ``ok``, ``request`` (the request's fault),
        ``credential``, ``exhausted``, ``rate_limited`` (429), ``overloaded``
        (529), ``server_error`` (another 5xx), ``timeout``, ``connect_error``,
        ``stream_error`` (a 2xx whose body failed) or ``error``."""
        if self.ok:
            return "ok"
        if self.cause in (CAUSE_REQUEST, CAUSE_CREDENTIAL, CAUSE_EXHAUSTED):
            return self.cause
        status = self.status
        if status is None:
            return "timeout" if self.error_type == "timeout" else "connect_error"
        if status == 429:
            return "rate_limited"
        if status == 529 or self.error_type == "overloaded_error":
            return "overloaded"
        if status >= 500:
            return "server_error"
        if status < 300:
            return "stream_error"
        return "error"


# Beta usage.iterations[] types billed outside the top-level counts ("message" ones are inside them).
SEPARATE_ITERATIONS = frozenset({"advisor_message", "compaction", "fallback_message"})
# The token counts of a usage object, and of each iteration.
TOKEN_COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


@dataclass(slots=True)
class UsageRecord:
    """One complete record per request, handed to every meter after it ended."""

    request_id: str
    started_at: float              # unix time
    endpoint: str
    client: str = ""
    key_id: Optional[int] = None
    key_name: Optional[str] = None
    channel_id: Optional[int] = None
    channel_name: Optional[str] = None
    requested_model: Optional[str] = None
    upstream_model: Optional[str] = None
    stream: bool = False
    status: int = 0                # status the client got (200 also for a stream that failed in-band)
    error_type: Optional[str] = None
    interrupted: bool = False      # the client went away before the response ended
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_5m_input_tokens: Optional[int] = None
    cache_creation_1h_input_tokens: Optional[int] = None
    server_tool_use: Optional[dict] = None   # e.g. {"web_search_requests": 2}
    web_search_requests: int = 0
    web_fetch_requests: int = 0
    service_tier: Optional[str] = None   # standard, priority, batch (as upstream reported)
    speed: Optional[str] = None          # standard, fast
    inference_geo: Optional[str] = None  # where inference ran, e.g. "us"
    iterations: Optional[list] = None    # beta usage.iterations[], as upstream reported
    raw_usage: Optional[dict] = None     # the final usage object, for audits and repricing
    ttfb_ms: Optional[float] = None  # time to the first upstream byte
    duration_ms: float = 0.0
    upstream_request_id: Optional[str] = None
    attempts: int = 0              # channels tried
    cost: Optional[float] = 0.0    # USD, computed from `prices`; None = the model has no price
    prices: Optional[dict] = None    # the rates and multipliers `cost` was computed with
    reached_upstream: bool = False   # some attempt got a connection to a channel
    # One entry per channel tried, in order: {"channel", "channel_id", "outcome"
    # (Outcome.kind, or "gateway_stopped": see stopped_attempt), "status", "error_type",
    # "upstream_request_id"}.
    attempt_log: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def total_tokens(self) -> int:
        return (self.input_tokens + self.output_tokens
                + self.cache_read_input_tokens + self.cache_creation_input_tokens)

    @property
    def billed_tokens(self) -> int:
        """The tokens a token quota counts: the top-level total plus the input, output, cache read and
        cache write tokens of each iteration billed apart from it (SEPARATE_ITERATIONS).  A count that is
        not a non-negative integer counts 0, as in pricing."""
        total = self.total_tokens
        for it in billed_apart(self.iterations):
            for name in TOKEN_COUNTS:
                value = it.get(name)
                if type(value) is int and value > 0:
                    total += value
        return total

    @property
    def usage_unknown(self) -> bool:
        """Whether the request went upstream and ended before the upstream reported any usage or an
        error: cut (its client left, or the gateway stopped), given up waiting (read_timeout), or a
        Messages answer of 2xx whose usage was never read (its body cut, unreadable, or without one).
        The upstream may bill it and nobody here knows how much: such a record's cost is None."""
        if not self.reached_upstream or self.raw_usage is not None:
            return False
        last = self.attempt_log[-1] if self.attempt_log else None
        if last is not None and last.get("refused"):
            # The upstream's own in-band error, before any usage: its word that it did not serve the request
            # (also read by the drain of a stream whose client left); an earlier send that got no answer may
            # still have been billed.
            return any(a.get("unanswered") for a in self.attempt_log[:-1])
        if self.interrupted and self.status in (0, 200, 499):
            return True
        if last is None:
            return False
        status = last.get("status")
        if status is not None and 200 <= status < 300:
            # The upstream answered the request as accepted; count_tokens (free) reports no usage.
            return self.endpoint == MESSAGES_ENDPOINT
        # Our own timeout: an attempt that sent the request got no answer, also one failed over from.
        return any(a.get("unanswered") for a in self.attempt_log)


def billed_apart(iterations: Optional[list]) -> Iterator[dict]:
    """The entries of a `usage.iterations` list billed apart from the top-level counts (SEPARATE_ITERATIONS);
    entries of another shape are not."""
    for it in iterations or ():
        if type(it) is dict and type(it.get("type")) is str and it["type"] in SEPARATE_ITERATIONS:
            yield it


def stopped_attempt(channel: Optional[str], channel_id: Optional[int], status: Optional[int],
                    upstream_request_id: Optional[str]) -> dict:
    """The attempt_log entry of an attempt the gateway died during (a checkpoint's or a sent line's row)."""
    return {"channel": channel, "channel_id": channel_id, "outcome": "gateway_stopped", "status": status,
            "error_type": None, "upstream_request_id": upstream_request_id}


class Reject(Exception):
    """Raised by a plugin to answer the client with an Anthropic-shaped error."""

    def __init__(self, status: int, error_type: str, message: str,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})


@runtime_checkable
class AuthPlugin(Protocol):
    async def authenticate(self, request: RequestInfo) -> Optional[Caller]:
        """Return the caller, None to let the next auth plugin decide, or raise Reject."""

    async def admit(self, request: RequestInfo, caller: Caller) -> Caller:
        """Optional, for a caller with ``admits`` set.  Called once the gateway has checked the request and
        found channels for it, just before it goes upstream (a request the gateway refuses itself never gets
        here): take what the request holds (a concurrency slot, a reservation, a place in the minute) or raise
        Reject (402/429/503).  Returns the caller that release() and finish() then get."""

    async def release(self, caller: Caller, record: UsageRecord) -> None:
        """Optional.  Called exactly once for every request this plugin
        authenticated (for a caller with ``admits``: admitted), once its answer is
        complete and metered (``record`` is priced) but before the answer's last
        bytes go out: give back what the request held (a concurrency slot), so the
        client's next request finds it free.  The answer waits for it: keep it short."""

    async def finish(self, caller: Caller, record: UsageRecord) -> None:
        """Optional.  Called exactly once for every request this plugin
        authenticated (but one its admit() refused), after it ended and the client
        has the answer (settle spend, alerts)."""

    def check_head(self, request: RequestInfo) -> Optional[bool]:
        """Optional.  The credential alone, from the request head (``body`` and
        ``model`` are None), before the body is read: a request no plugin would
        admit is then refused without reading or parsing its body.  True: the
        credential is this plugin's and usable; None: not this plugin's to say;
        raise Reject to refuse.  Synchronous and without side effects:
        authenticate() still runs once the body is in."""


@runtime_checkable
class RouterPlugin(Protocol):
    async def route(self, request: RequestInfo, caller: Caller) -> Optional[Sequence[Channel]]:
        """Candidate channels in failover order, or None to defer to the next router."""

    def feedback(self, outcome: Outcome) -> None:
        """Optional.  Called after every attempt (cooldowns, health, auto-disable)."""

    def models(self, caller: Caller) -> Sequence[ModelInfo]:
        """Optional.  The models this caller may use, for GET /v1/models."""


@runtime_checkable
class MeterPlugin(Protocol):
    async def record(self, record: UsageRecord) -> None:
        """Called once per finished request, also failed and interrupted ones.
        Must not block: queue the write and return."""

    def sent(self, record: UsageRecord) -> None:
        """Optional.  The request is about to go upstream (called on each
        attempt, once it holds a connection to the channel): from here the
        upstream may bill it.  checkpoint() or record() follows for the same
        request id and replaces it; a meter keeps it only for the case that
        the gateway dies first, as a request whose usage nobody knew.
        Synchronous, on every request's path: must not block, keep it small."""

    def checkpoint(self, record: UsageRecord) -> None:
        """Optional.  A stream's usage as first reported (its message_start:
        the input the upstream bills whatever happens next), or a batch's
        billed results, priced and flagged ``interrupted``, while the request
        goes on.  record() follows for the
        same request id and replaces it; a meter keeps it only for the case
        that the gateway dies first (see the sqlite meter's spool).
        Synchronous, on the stream's path: must not block.  The record goes on
        changing after the call: take what you keep during it."""
