"""First-party auth plugin ``keys``: the gateway's own API keys, from the store.

Everything on the request path is served from memory: a dict from the SHA-256
of the presented key to that key's state, rebuilt from the store's shared
configuration snapshot whenever it changes (apertis_proxy.store.changes).  A
background task settles this process's spend in the store and re-reads every
key's spend, so quotas see what the other worker processes and hosts spent.

While the store cannot be reached, known keys keep working from the last
snapshot; a key the snapshot does not know gets 503 with retry-after (it may
have been created meanwhile), never a 401.

Rules, in the order they are checked:
  401 authentication_error  no key, unknown key, disabled key, expired key, a rotated-out
                            secret past its grace period
  403 permission_error      the model is not in the key's allow-list
  402 billing_error         the key's quota (USD or tokens) is used up: its lifetime spend, or
                            for a quota per day/week/month (UTC) its spend in the current period
  429 rate_limit_error      too many requests in flight / per minute (retry-after)

Why 402 for an exhausted quota: it is Anthropic's own status for "your
account cannot pay for this", SDKs and Claude Code do not retry it (they would
retry 429 and every 5xx), and it tells the user something no retry can fix.

Limits hold across worker processes and hosts: a request of a key with a
quota, rpm or concurrency limit is admitted (``admit()``, once the gateway has
checked and routed it: a request it refuses itself takes nothing; files and
batches requests right after the key check) by one
transaction in the shared store (apertis_proxy.store.admissions), which reserves an upper bound of its
cost (apertis_proxy.budgets.reservation) and takes a concurrency slot;
``release()`` gives the slot back before the answer's last bytes and turns the
reservation into the exact cost, which the ledger row then settles (a key
without a concurrency limit is released just after the answer, without making
it wait; a request of unknown cost keeps its bound as its cost).  Near the
end of a quota, a request whose bound does not fit is admitted only while
nothing else of the key is in flight (429 with retry-after otherwise), so a
quota is overshot by at most one request.  Keys without limits never wait on
the store.  Files and batches requests count against rpm and concurrency (they
reserve nothing: files cost nothing and a key with a quota cannot create
batches); model listings and token counting (free, and limited by the API
apart from messages) are not limited.

While the store cannot be reached, a limited key gets 503 with retry-after, or
with ``[limits] on_store_down = "share"`` each process admits on its own
against its share of the last known headroom (the limits divided by the
gateway processes that held a lease; see docs/plugins.md for the bound).

Every refusal is counted per key and reason (apertis_proxy.budgets.refusals),
and with ``[budgets] webhook_url`` set, a key reaching a threshold of its quota
raises an alert (apertis_proxy.budgets.alerts); both are written by the
background tick, never on the request path.

Options (``[plugins.options.keys]``):
  poll_interval  seconds between checks for CLI edits and spend flushes (1.0)
  on_unknown     "reject" (default) answers 401 for a missing or unknown key;
                 "defer" returns None so a later auth plugin may try
  budget_*       the gateway's [budgets] settings, filled in by the plugin host
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Mapping, Optional

from apertis_proxy.budgets.alerts import DEFAULT_THRESHOLDS, AlertConfig, BudgetAlerts, QuotaUse
from apertis_proxy.budgets.limiter import DEFAULT_LEASE_SECONDS, Limiter
from apertis_proxy.budgets.periods import PERIODS, period_end, period_start
from apertis_proxy.budgets.refusals import RefusalCounter
from apertis_proxy.budgets.reservation import billed_models, request_bound
from apertis_proxy.plugin_api import Caller, PluginContext, Reject, RequestInfo, UsageRecord
from apertis_proxy.store import budgets as budget_store
from apertis_proxy.store.admissions import BUSY_RETRY_AFTER, Decision, Limits, cost_reached
from apertis_proxy.store.budgets import UNKNOWN_KEY
from apertis_proxy.store.catalog import Catalog
from apertis_proxy.store.config import ConfigSnapshot
from apertis_proxy.store.keys import hash_key
from apertis_proxy.store.service import StoreUnavailable, store_for_plugin

RPM_WINDOW = 60.0           # seconds: requests per minute is a sliding one-minute window
CONCURRENCY_RETRY_AFTER = BUSY_RETRY_AFTER  # seconds: a slot usually frees up quickly
CLOSE_ATTEMPTS = 5
_OWNED_PATHS = ("/v1/files", "/v1/messages/batches")     # limited though sent without a JSON body
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"          # free: no limit of the key's applies
STORE_DOWN_RETRY_AFTER = 5   # seconds: a client retries an unknown key, or a limited one, while the store is down


@dataclass(slots=True)
class KeyState:
    """One key: its configuration (replaced on reload) and its running totals
    (kept across reloads)."""

    id: int
    name: str
    key_hash: str
    enabled: bool = True
    expires_at: Optional[float] = None
    models: Optional[tuple[str, ...]] = None        # the allow-list as configured
    allowed: Optional[frozenset[str]] = None        # + catalogue ids and aliases, both ways
    admitted: Optional[frozenset[str]] = None       # + channel alias names resolving to allowed models
    quota_cost: Optional[float] = None
    quota_tokens: Optional[int] = None
    quota_period: Optional[str] = None              # day, week, month (UTC); None = lifetime
    rpm: Optional[int] = None
    concurrency: Optional[int] = None
    limits: Optional[Limits] = None                 # None: no limit, never admitted through the store
    # Spend = settled (read from key_spend) + flushing (being written) + pending.
    settled_cost: float = 0.0
    settled_tokens: int = 0
    flushing_cost: float = 0.0
    flushing_tokens: int = 0
    pending_cost: float = 0.0
    pending_tokens: int = 0
    # Settled spend in the current quota period (read from key_period_spend).
    period_cost: float = 0.0
    period_tokens: int = 0
    # Admitted by this process on its own while the store was unreachable ("share" mode).
    in_flight: int = 0
    recent: collections.deque = field(default_factory=collections.deque)  # admission times
    last_use: Optional[Decision] = None             # the store's last decision for this key
    alone_cost: float = 0.0                         # spent on its own since the store was last reached
    alone_tokens: int = 0
    caller: Optional[Caller] = None     # what authenticate() answers; rebuilt after a reload
    admitted_caller: Optional[Caller] = None    # the same, for a request admitted in the store
    alone_caller: Optional[Caller] = None       # the same, admitted by this process alone
    previous_hashes: frozenset = frozenset()    # rotated-out secrets (requests may still finish)
    period_start: Optional[str] = None          # first day of the current quota period

    @property
    def spent_cost(self) -> float:
        return self.settled_cost + self.flushing_cost + self.pending_cost

    @property
    def spent_tokens(self) -> int:
        return self.settled_tokens + self.flushing_tokens + self.pending_tokens

    # What the quota is checked against: lifetime spend, or the current period's.
    @property
    def quota_cost_spent(self) -> float:
        if self.quota_period is None:
            return self.spent_cost
        return self.period_cost + self.flushing_cost + self.pending_cost

    @property
    def quota_tokens_spent(self) -> int:
        if self.quota_period is None:
            return self.spent_tokens
        return self.period_tokens + self.flushing_tokens + self.pending_tokens

    def quota_use(self) -> Optional[QuotaUse]:
        """Settled spend against the quota (what every worker agrees on), None without a quota."""
        start = self.period_start
        if self.quota_cost is not None:
            spend = self.period_cost if self.quota_period else self.settled_cost
            return QuotaUse(self.id, self.name, self.quota_period, start, "usd", spend, self.quota_cost)
        if self.quota_tokens is not None:
            spend = self.period_tokens if self.quota_period else self.settled_tokens
            return QuotaUse(self.id, self.name, self.quota_period, start, "tokens", spend, self.quota_tokens)
        return None


def presented_key(headers: Mapping[str, str]) -> Optional[str]:
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def expand_allowed(models: Iterable[str], catalog: Catalog) -> frozenset[str]:
    """A key allowed one name of a catalogue model may use all its names."""
    names = set(models)
    for name in list(names):
        entry = catalog.by_name.get(name)
        if entry is not None:
            names.add(entry.id)
            names.update(entry.aliases)
    return frozenset(names)


def admitted_names(allowed: frozenset[str], channel_aliases: Iterable[Mapping[str, str]]) -> frozenset[str]:
    """Channel-specific alias names (client name -> upstream id) that resolve, on
    that channel, to a model the key may use.  The router re-checks per channel."""
    extra = set()
    for aliases in channel_aliases:
        targets = {aliases.get(n, n) for n in allowed}
        extra.update(name for name, upstream in aliases.items()
                     if upstream in allowed or upstream in targets)
    return allowed | extra


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KeysAuth:
    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.workers = max(1, int(ctx.workers or 1))
        self.defer_unknown = str(ctx.options.get("on_unknown", "reject")) == "defer"
        # The wall clock periods are computed from (tests may replace it).
        self.clock = time.time
        self.refusals = RefusalCounter()
        self.alerts = _alerts(ctx)
        self.by_hash: dict[str, KeyState] = {}
        self.by_id: dict[int, KeyState] = {}
        # Rotated-out secrets: hash -> (the key, unix time it stops working).
        self.grace: dict[str, tuple[KeyState, float]] = {}
        self.interval = max(0.01, float(ctx.options.get("poll_interval", 1.0)))
        self.store = None
        self._owns_store = False
        self._watcher = None
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._spend_lock = asyncio.Lock()
        self._stopping = False
        # With the sqlite meter, a request's spend reaches key_spend in the ledger's
        # own transaction; until its row is shipped it counts here as pending,
        # by request id: request id -> (key id, cost, tokens).
        self.ledger_settles = "sqlite" in ctx.meters
        self._unshipped: dict[str, tuple[int, float, int]] = {}
        # Bounds this plugin settles itself with the sqlite meter (see finish()):
        # (key id, cost, tokens, quota period, its start).
        self._unmetered: list[tuple[int, float, int, Optional[str], Optional[str]]] = []
        self._unmetered_settled: list[tuple[int, float, int]] = []     # in the spend, not yet re-read
        self.lease_seconds = float(ctx.options.get("limits_lease_seconds", DEFAULT_LEASE_SECONDS))
        self.share_when_down = str(ctx.options.get("limits_on_store_down", "refuse")) == "share"
        self.limiter: Optional[Limiter] = None
        self.catalog: Optional[Catalog] = None
        self.channel_aliases: list[dict[str, str]] = []     # each channel's aliases, for the bounds

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.store, self._owns_store = await store_for_plugin(self.ctx)
        self._watcher = self.store.watcher(self.interval)
        await self._watcher.start()
        self._watcher.subscribe(self._reload)
        await self._sync_spend()
        self.limiter = Limiter(self.store, self.lease_seconds, self.log)
        await self.limiter.start()
        self._task = asyncio.get_running_loop().create_task(self._spend_loop())

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.limiter is not None:
            await self.limiter.close()
        if self._watcher is not None:
            self._watcher.unsubscribe(self._reload)
            if self.alerts is not None:
                await self.alerts.close(self.store)
            for attempt in range(CLOSE_ATTEMPTS):
                try:
                    await self._sync_spend()
                    await self._save_refusals()
                    break
                except Exception:
                    self.log.exception("could not save spend at shutdown (try %d)", attempt + 1)
                    await asyncio.sleep(0.1 * 2 ** attempt)
        if self._owns_store and self.store is not None:
            await self.store.close()

    async def refresh(self) -> None:
        """Reload now if the configuration changed, flush and re-read spend, save refusals, check alerts."""
        await self._watcher.refresh()
        await self._tick()

    async def _spend_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self._tick()
            except Exception as exc:   # retried on the next interval; the amounts stay pending
                self.log.error("settling spend failed (%s); retrying", exc)

    # -- request path (no awaits: check-then-admit is atomic) -----------------

    def check_head(self, request: RequestInfo) -> Optional[bool]:
        return self._usable_key(request) is not None or None

    def _usable_key(self, request: RequestInfo) -> Optional[KeyState]:
        """The presented key if it is known, enabled and unexpired; None when it
        is not this plugin's to judge (on_unknown = "defer"); else Reject."""
        plain = presented_key(request.headers)
        if plain is None:
            if self.defer_unknown:
                return None
            raise self._refused(UNKNOWN_KEY, "missing_key", Reject(
                401, "authentication_error",
                "missing API key: send it in the x-api-key header or as Authorization: Bearer"))
        key_hash = hash_key(plain)
        key = self.by_hash.get(key_hash)
        if key is None:
            key = self._rotated_key(key_hash)
        if key is None:
            if self.defer_unknown:
                return None
            if self._watcher is not None and not self._watcher.reachable:
                raise Reject(503, "api_error", "the gateway's key store cannot be reached; retry shortly",
                             headers={"retry-after": str(STORE_DOWN_RETRY_AFTER)})
            raise self._refused(UNKNOWN_KEY, "invalid_key",
                                Reject(401, "authentication_error", "invalid API key"))
        if not key.enabled:
            raise self._refused(key.name, "disabled",
                                Reject(401, "authentication_error", f"API key '{key.name}' is disabled"))
        if key.expires_at is not None and time.time() >= key.expires_at:
            raise self._refused(key.name, "expired", Reject(
                401, "authentication_error", f"API key '{key.name}' expired at {_iso(key.expires_at)}"))
        return key

    async def authenticate(self, request: RequestInfo) -> Optional[Caller]:
        key = self._usable_key(request)
        if key is None:
            return None
        model = request.model
        if model and key.admitted is not None and model not in key.admitted:
            raise self._refused(key.name, "model_not_allowed", Reject(
                403, "permission_error",
                f"API key '{key.name}' may not use model '{model}'; it may use: {', '.join(key.models or ())}"))
        return _callers(key)

    async def admit(self, request: RequestInfo, caller: Caller) -> Caller:
        """The request is checked and routed: a key with limits is admitted in the store now, so a request
        the gateway refuses itself (a malformed body, a model nobody serves, every channel resting) takes
        no place in the key's minute, slots or quota."""
        # The key as it is now: one disabled, expired, rotated out or deleted since its check goes no further,
        # and one whose limits changed meanwhile is admitted (and released) under its new ones.
        key = self._usable_key(request)
        if key is None or key.id != caller.key_id:
            raise self._refused(caller.key_name, "invalid_key", Reject(401, "authentication_error", "invalid API key"))
        _callers(key)
        if key.limits is None or not _limited(request, key.limits):
            return caller
        admitted = await self._admit(key, request)
        if caller.models is not key.allowed:
            # The gateway widened the caller meanwhile (a retired model's successor): kept.
            admitted = dataclasses.replace(admitted, models=caller.models)
        return admitted

    async def _admit(self, key: KeyState, request: RequestInfo) -> Caller:
        """Admit a request of a limited key in the store (see the module docstring).  The caller it returns
        tells release() what the admission holds under the limits it was made with (a reload may come while
        the store decides)."""
        limits, admitted_caller = key.limits, key.admitted_caller
        assert limits is not None and self.limiter is not None
        bound_cost, bound_tokens = 0.0, 0
        if (limits.quota_cost is not None or limits.quota_tokens is not None) and self.catalog is not None \
                and request.body is not None:
            now = time.time()
            bound = request_bound(self.catalog, billed_models(self.catalog, request.model, self.channel_aliases, now),
                                  request.body, request.body_bytes, now)
            if limits.quota_cost is not None:
                bound_cost = bound.cost
            if limits.quota_tokens is not None:
                bound_tokens = bound.tokens
        try:
            decision = await self.limiter.admit(limits, request.request_id, bound_cost, bound_tokens)
        except StoreUnavailable as exc:
            if self.share_when_down:
                return self._admit_alone(key, bound_cost, bound_tokens)
            self.log.error("admission of %s in the store failed: %s", key.name, exc)
            raise self._refused(key.name, "store_unavailable", Reject(
                503, "api_error", "the gateway's limits store cannot be reached; retry shortly",
                headers={"retry-after": str(STORE_DOWN_RETRY_AFTER)})) from None
        key.last_use = decision
        key.alone_cost, key.alone_tokens = 0.0, 0
        if not decision.admitted:
            raise self._refused(key.name, decision.reason, self._reject(key, decision))
        return admitted_caller

    def _reject(self, key: KeyState, decision: Decision) -> Reject:
        use = decision.use
        if decision.reason == "quota":
            assert use is not None
            if key.quota_cost is not None and cost_reached(use.spent_cost, key.quota_cost):
                return _quota_reject(key, f"${use.spent_cost:.4f} of ${key.quota_cost:.4f}")
            return _quota_reject(key, f"{use.spent_tokens} of {key.quota_tokens} tokens")
        if decision.reason == "concurrency":
            return _busy(f"API key '{key.name}' already has {key.concurrency} requests in flight, "
                         f"its concurrency limit", decision.retry_after)
        if decision.reason == "rpm":
            return _busy(f"API key '{key.name}' exceeded its limit of {key.rpm} requests per minute",
                         decision.retry_after)
        return _busy(f"API key '{key.name}' is close to its {_quota_name(key)}: this request could cost more "
                     f"than is left beside the requests in flight; retry when they finished",
                     decision.retry_after)

    def _admit_alone(self, key: KeyState, bound_cost: float, bound_tokens: int) -> Caller:
        """The store is unreachable: admit against this process's share of the last known headroom."""
        shares = max(1, self.limiter.holders if self.limiter is not None else 1)
        mono = time.monotonic()
        try:
            self._check_share(key, shares, bound_cost, bound_tokens)
            self._check_concurrency(key, _share(key.concurrency, shares))
            self._check_rpm(key, mono, _share(key.rpm, shares))
        except _Refusal as refusal:
            raise self._refused(key.name, refusal.reason, refusal.reject) from None
        key.in_flight += 1
        key.alone_cost += bound_cost
        key.alone_tokens += bound_tokens
        if key.rpm is not None:
            key.recent.append(mono)
        if not (bound_cost or bound_tokens):
            return key.alone_caller
        # The bound, for finish() to count should the request's usage be unknown.
        caller = key.alone_caller
        return dataclasses.replace(caller, data={**caller.data, "bound": (bound_cost, bound_tokens)})

    def _rotated_key(self, key_hash: str) -> Optional[KeyState]:
        """The key an old secret belongs to, while its grace period lasts."""
        entry = self.grace.get(key_hash)
        if entry is None:
            return None
        key, until = entry
        if time.time() >= until:
            raise self._refused(key.name, "rotated_out", Reject(
                401, "authentication_error",
                f"API key '{key.name}' was rotated; its old secret stopped working at {_iso(until)}"))
        return key

    def _refused(self, key_name: str, reason: str, reject: Reject) -> Reject:
        """Count a refusal (per key and reason) and return the Reject to raise."""
        self.refusals.count(key_name, reason, reject.status, self.clock())
        return reject

    def _check_share(self, key: KeyState, shares: int, bound_cost: float, bound_tokens: int) -> None:
        """This process's share of the headroom last seen in the store (or, before any decision, of
        the settled spend), minus what it admitted alone since."""
        use = key.last_use.use if key.last_use is not None else None
        if key.quota_cost is not None:
            spent = use.spent_cost + use.live_cost if use is not None else key.quota_cost_spent
            left = 0.0 if cost_reached(spent, key.quota_cost) else key.quota_cost - spent
            self._check_headroom(key, left / shares, key.alone_cost, bound_cost)
        if key.quota_tokens is not None:
            spent = use.spent_tokens + use.live_tokens if use is not None else key.quota_tokens_spent
            self._check_headroom(key, (key.quota_tokens - spent) / shares, key.alone_tokens, bound_tokens)

    def _check_headroom(self, key: KeyState, share: float, used: float, bound: float) -> None:
        if used + bound <= share or (key.in_flight == 0 and used < share):
            return
        raise _Refusal("store_unavailable", _busy(
            f"API key '{key.name}' is close to its {_quota_name(key)} and the gateway's limits store cannot "
            f"be reached; retry shortly", STORE_DOWN_RETRY_AFTER))

    def _check_concurrency(self, key: KeyState, limit: Optional[int]) -> None:
        if limit is not None and key.in_flight >= limit:
            raise _Refusal("concurrency", _busy(
                f"API key '{key.name}' already has {key.concurrency} requests in flight, its concurrency limit",
                CONCURRENCY_RETRY_AFTER))

    def _check_rpm(self, key: KeyState, now: float, limit: Optional[int]) -> None:
        if limit is None:
            return
        recent = key.recent
        while recent and recent[0] <= now - RPM_WINDOW:
            recent.popleft()
        if len(recent) >= limit:
            # A slot frees when the admission that brings the minute under the limit leaves it (not the oldest
            # when the minute holds more than the limit: a share that shrank).
            wait = max(1, math.ceil(recent[len(recent) - limit] + RPM_WINDOW - now))
            raise _Refusal("rpm", _busy(
                f"API key '{key.name}' exceeded its limit of {key.rpm} requests per minute", wait))

    async def release(self, caller: Caller, record: UsageRecord) -> None:
        """Before the answer's last bytes: the request's concurrency slot is free, its reservation
        becomes its exact cost (see the module docstring)."""
        holds = caller.data.get("holds")
        if holds is None or self.limiter is None:
            return
        if record.cost is None:
            # No price for its usage, or its usage is unknown: the upstream may bill it, and the reserved
            # bound stands as its cost (and as its tokens when they are unknown too).
            cost, tokens = None, None if record.usage_unknown else max(0, record.billed_tokens)
        else:
            cost = record.cost if record.cost > 0 else 0.0
            tokens = max(0, record.billed_tokens)
        key = self.by_id.get(caller.key_id)
        period = key.quota_period if key is not None else None
        if self.ledger_settles:
            # The UTC day the request started: until its ledger row lands its exact cost counts in every
            # quota period that holds that day (whatever the key's period is by then), and in no later one.
            start = time.strftime("%Y-%m-%d", time.gmtime(record.started_at))
        else:
            start = period_start(period, record.started_at) if period else ""
        args = (caller.key_id, record.request_id, cost, tokens, self.ledger_settles, period, start)
        if holds == "slot":
            await self.limiter.release(*args)
        else:
            self.limiter.release_soon(*args)    # only a reservation: the answer need not wait for it

    async def finish(self, caller: Caller, record: UsageRecord) -> None:
        key = self.by_id.get(caller.key_id) if caller.key_id is not None else None
        presented = caller.data.get("key_hash")
        if key is None or (key.key_hash != presented and presented not in key.previous_hashes):
            return      # deleted while the request ran
        if caller.data.get("holds") is not None:
            return      # settled through the store: release() made the reservation the exact cost
        if caller.data.get("alone"):
            key.in_flight = max(0, key.in_flight - 1)
        unmetered = record.cost is None and "bound" in caller.data
        if unmetered:
            # Admitted alone, no price for its usage or its usage unknown: the upstream may bill it, and no
            # admission in the store holds its bound for the ledger row to settle: this plugin settles it.
            bound_cost, bound_tokens = caller.data["bound"]
            cost = bound_cost
            tokens = bound_tokens if record.usage_unknown else max(0, record.billed_tokens)
        else:
            cost = record.cost if record.cost and record.cost > 0 else 0.0
            tokens = max(0, record.billed_tokens)
        if cost or tokens:
            key.pending_cost += cost
            key.pending_tokens += tokens
            if self.ledger_settles:
                if unmetered:
                    # Its ledger row (cost NULL) finds no admission to settle a bound from: this plugin
                    # settles the bound, with its tokens where the row holds none; the row, its own tokens.
                    own_tokens = tokens if record.usage_unknown else 0
                    start = period_start(key.quota_period, record.started_at) if key.quota_period else None
                    self._unmetered.append((key.id, cost, own_tokens, key.quota_period, start))
                    cost, tokens = 0.0, tokens - own_tokens
                if cost or tokens:
                    self._unshipped[record.request_id] = (key.id, cost, tokens)
            if key.quota_cost is not None or key.quota_tokens is not None:
                # A quota may just have been reached: settle soon rather than on
                # the next interval, so other workers see it too.
                self._wake.set()

    # -- background ----------------------------------------------------------

    async def _tick(self) -> None:
        """Every interval: spend, refusal counts, budget alerts."""
        await self._sync_spend()
        await self._save_refusals()
        if self.alerts is not None:
            uses = [use for use in (key.quota_use() for key in self.by_id.values()) if use is not None]
            await self.alerts.check(self.store, uses, self.clock())

    async def _save_refusals(self) -> None:
        counts = self.refusals.take()
        if not counts:
            return
        try:
            await self.store.call(budget_store.add_refusals, counts)
        except BaseException:
            self.refusals.give_back(counts)
            raise

    def _reload(self, snapshot: ConfigSnapshot) -> None:
        catalog = snapshot.catalog
        channel_aliases = [dict(ch.aliases) for ch in snapshot.channels if ch.aliases]
        rows = snapshot.keys
        grace_rows = snapshot.grace
        rotated: dict[int, set[str]] = {}
        for grace_row in grace_rows:
            rotated.setdefault(grace_row.key_id, set()).add(grace_row.key_hash)
        by_hash: dict[str, KeyState] = {}
        by_id: dict[int, KeyState] = {}
        for row in rows:
            key = self.by_id.get(row.id)
            old = rotated.get(row.id, set())
            if key is not None and key.key_hash in old:
                # Rotated: the same key with a new secret; running totals and in-flight counts stay.
                key.key_hash = row.key_hash
            if key is None or key.key_hash != row.key_hash:    # new, or an id reused
                key = KeyState(id=row.id, name=row.name, key_hash=row.key_hash)
            models = row.models
            key.name = row.name
            key.enabled = row.enabled
            key.expires_at = row.expires_at
            key.models = models
            key.allowed = expand_allowed(models, catalog) if models else None
            key.admitted = admitted_names(key.allowed, channel_aliases) if models else None
            key.quota_cost = row.quota_cost
            key.quota_tokens = row.quota_tokens
            key.quota_period = row.quota_period if row.quota_period in PERIODS else None
            key.rpm = row.rpm
            key.concurrency = row.concurrency
            key.limits = (Limits(key.id, row.quota_cost, row.quota_tokens, key.quota_period, row.rpm,
                                 row.concurrency)
                          if any(v is not None for v in (row.quota_cost, row.quota_tokens, row.rpm,
                                                         row.concurrency)) else None)
            key.caller = None       # name or allow-list may have changed
            key.previous_hashes = frozenset(old)
            by_hash[row.key_hash] = key
            by_id[key.id] = key
        grace = {r.key_hash: (by_id[r.key_id], r.until) for r in grace_rows if r.key_id in by_id}
        # Swap the maps in one step: the request path never sees a half reload.
        self.by_hash, self.by_id, self.grace = by_hash, by_id, grace
        self.catalog = catalog
        self.channel_aliases = channel_aliases
        self.log.info("loaded %d keys", len(by_id))

    async def _sync_spend(self) -> None:
        """Add this process's pending spend to the store (and to the current quota period's) and re-read
        everybody's; with the sqlite meter only re-read: the ledger settles it."""
        starts = {period: period_start(period, self.clock()) for period in PERIODS}
        async with self._spend_lock:
            if self.ledger_settles:
                await self._settle_unmetered(starts)
                await self._read_settled_spend(starts)
            else:
                await self._settle(starts)

    async def _settle_unmetered(self, starts: dict[str, str]) -> None:
        """Add the bounds finish() set aside to the keys' spend (their ledger rows settle nothing); they
        leave the pending spend when the spend is next re-read."""
        batch, self._unmetered = self._unmetered, []
        if not batch:
            return
        try:
            await self.store.settle_spend([(key_id, cost, tokens) for key_id, cost, tokens, _, _ in batch],
                                          [(key_id, period, start, cost, tokens)
                                           for key_id, cost, tokens, period, start in batch if period],
                                          starts)
        except BaseException:
            self._unmetered[:0] = batch
            raise
        self._unmetered_settled.extend(entry[:3] for entry in batch)

    async def _settle(self, starts: dict[str, str]) -> None:
        batch = []
        for key in self.by_id.values():
            if key.pending_cost or key.pending_tokens:
                key.flushing_cost, key.pending_cost = key.flushing_cost + key.pending_cost, 0.0
                key.flushing_tokens, key.pending_tokens = key.flushing_tokens + key.pending_tokens, 0
                batch.append(key)
        try:
            spend, in_period = await self.store.settle_spend(
                [(k.id, k.flushing_cost, k.flushing_tokens) for k in batch],
                [(k.id, k.quota_period, starts[k.quota_period], k.flushing_cost, k.flushing_tokens)
                 for k in batch if k.quota_period is not None], starts)
        except BaseException:
            # Not written: the amounts go back to pending and are retried later.
            for key in batch:
                key.pending_cost += key.flushing_cost
                key.pending_tokens += key.flushing_tokens
                key.flushing_cost, key.flushing_tokens = 0.0, 0
            raise
        # No await from here on: settled and flushing change together.
        self._apply_spend(spend, in_period, starts)

    async def _read_settled_spend(self, starts: dict[str, str]) -> None:
        """Re-read key_spend (and the current periods' spend); requests whose ledger rows it now includes,
        and the bounds settled by _settle_unmetered, stop being pending.  All is read in one transaction, so
        no request counts twice or not at all."""
        periodic = starts if any(k.quota_period for k in self.by_id.values()) else {}
        shipped, spend, in_period = await self.store.shipped_and_spend(list(self._unshipped), periodic)
        settled, self._unmetered_settled = self._unmetered_settled, []
        for key_id, cost, tokens in [*map(self._unshipped.pop, shipped), *settled]:
            key = self.by_id.get(key_id)
            if key is not None:
                key.pending_cost = max(0.0, key.pending_cost - cost)
                key.pending_tokens = max(0, key.pending_tokens - tokens)
        # No await from here on.
        self._apply_spend(spend, in_period, starts)

    def _apply_spend(self, spend, in_period, starts: dict[str, str]) -> None:
        for key in self.by_id.values():
            key.settled_cost, key.settled_tokens = spend.get(key.id, (0.0, 0))
            key.flushing_cost, key.flushing_tokens = 0.0, 0
            if key.quota_period is not None:
                key.period_start = starts[key.quota_period]
                key.period_cost, key.period_tokens = in_period.get((key.id, key.quota_period), (0.0, 0))


class _Refusal(Exception):
    """A limit check's Reject with the reason it is counted under."""

    def __init__(self, reason: str, reject: Reject) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reject = reject


def _callers(key: KeyState) -> Caller:
    """The key's caller, and beside it those telling release() and finish() how its request was admitted (in
    the store, holding what `_holds` says; or alone), built once per version of the key (a reload clears them)."""
    caller = key.caller
    if caller is None:
        # The hash tells finish() this key from a later one given the same id
        # (SQLite reuses the highest id after a delete).
        data = {"key_hash": key.key_hash}
        caller = key.caller = Caller(key_id=key.id, key_name=key.name, models=key.allowed, data=data,
                                     cost_limited=key.quota_cost is not None,
                                     token_limited=key.quota_tokens is not None,
                                     admits=key.limits is not None)
        key.admitted_caller = dataclasses.replace(caller, data={**data, "holds": _holds(key.limits)})
        key.alone_caller = dataclasses.replace(caller, data={**data, "alone": True})
    return caller


def _limited(request: RequestInfo, limits: Limits) -> bool:
    """Whether `request` of a key with `limits` is admitted in the store.  Messages are.  Files and batches
    requests come without a JSON body, and cost nothing against a quota (a key with one cannot create batches):
    they count against `rpm` and `concurrency`.  Model listings and token counting (free; the API limits it
    apart from messages) count against nothing."""
    if request.body is None:
        return (limits.rpm is not None or limits.concurrency is not None) and request.path.startswith(_OWNED_PATHS)
    return request.path != COUNT_TOKENS_PATH


def _holds(limits: Optional[Limits]) -> Optional[str]:
    """What an admission under `limits` holds until its release: a concurrency slot (released before the
    answer's last bytes), a quota reservation only (released just after), or nothing (rpm alone)."""
    if limits is None:
        return None
    if limits.concurrency is not None:
        return "slot"
    if limits.quota_cost is not None or limits.quota_tokens is not None:
        return "reservation"
    return None


def _quota_reject(key: KeyState, used: str) -> Reject:
    return Reject(402, "billing_error", f"API key '{key.name}' has used its {_quota_name(key)}: {used}"
                  + _resets(key), headers={"x-should-retry": "false"})


def _busy(message: str, retry_after: Optional[int]) -> Reject:
    return Reject(429, "rate_limit_error", message, headers={"retry-after": str(retry_after or 1)})


def _share(limit: Optional[int], shares: int) -> Optional[int]:
    """A process's share of a limit while it admits alone (at least one request)."""
    return None if limit is None else max(1, limit // shares)


def _quota_name(key: KeyState) -> str:
    return f"quota for this {key.quota_period}" if key.quota_period else "quota"


def _resets(key: KeyState) -> str:
    if key.quota_period is None or key.period_start is None:
        return ""
    return f"; it resets on {period_end(key.quota_period, key.period_start)} 00:00 UTC"


def _alerts(ctx: PluginContext) -> Optional[BudgetAlerts]:
    """Budget alerts when the gateway has a [budgets] webhook_url, else None."""
    url = ctx.options.get("budget_webhook_url")
    if not url:
        return None
    config = AlertConfig(url=str(url),
                         thresholds=tuple(sorted(int(t) for t in ctx.options.get("budget_thresholds",
                                                                                   DEFAULT_THRESHOLDS))),
                         attempts=int(ctx.options.get("budget_webhook_attempts", 5)),
                         backoff=float(ctx.options.get("budget_webhook_backoff", 1.0)))
    return BudgetAlerts(config, ctx.log)
