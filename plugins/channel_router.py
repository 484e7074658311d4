"""First-party router plugin ``channels``: the enabled rows of the channels table.

Order of the candidate list (the core tries it in order, failing over only
before any byte reached the client, so its length is the retry budget):

1. channels that serve the model and on which the caller may use it;
2. priority tiers, higher first; inside a tier a weighted random order
   (sampling without replacement, so failover tries the rest of the tier
   before the next tier);
3. channels cooling down after a failure move to the end, in that same order;
   when every channel serving the model cools down, the request is refused
   with 503 ``overloaded_error`` and a retry-after for the first to come back
   (503 ``api_error`` when every one is disabled: an outage the operator ends);
4. affinity: a request of a session (``x-claude-code-session-id``, else
   ``metadata.user_id``) goes first to the channel that served the session
   last, while that channel is healthy, because thinking signatures and prompt
   caches belong to one upstream account;
5. the list is cut to ``max_attempts``.

A request whose thread, container or files live on one upstream account
(``RequestInfo.account``) gets only the channels of that account.

Feedback after every attempt (``Outcome.cause``, decided by the gateway):
success clears a cooldown; a transient failure (429, 529/overloaded, 5xx,
connect errors, timeouts) starts one (the upstream retry-after wins over the
defaults; overload never disables a channel); an exhausted account (spend or
ramp limit) rests for ``cooldown_exhausted``; a refused credential (401, a 403
saying the key or organisation is refused) disables the channel in the database
with the reason, shown by ``channels list``; a request at fault changes nothing.

Health: on each change of a channel's state (a failure counted, a cooldown
started or ended, a channel disabled) this worker's view is written, coalesced,
to ``channel_health`` (store/channel_health.py) off the request path, for
``channels list`` to show.

Options (``[plugins.options.channels]``):
  max_attempts            candidates per request, i.e. 1 + retries (3)
  poll_interval           seconds between checks for CLI edits (1.0)
  cooldown_rate_limited   seconds after a 429 without retry-after (30)
  cooldown_overloaded     ... after a 529 / overloaded_error (5)
  cooldown_server_error   ... after another 5xx (10)
  cooldown_connect_error  ... after a connect error or timeout (15)
  cooldown_exhausted      ... after a spend or ramp limit (3600; not capped by max_cooldown)
  max_cooldown            cap on any other cooldown, retry-after included (600)
  disable_on              statuses of a refused credential that disable a channel ([401, 403])
  health_write_delay      seconds a health change waits so that others join its write (0.2)
  affinity_ttl            seconds a session stays pinned after its last request (3600)
  affinity_max_sessions   sessions remembered, least recently used dropped first (100000)
  seed                    seed of the weighted choice (tests)
"""
from __future__ import annotations

import asyncio
import collections
import math
import random
import socket
import time
from datetime import datetime, timezone
from typing import Hashable, Optional, Sequence

from apertis_proxy.plugin_api import (CAUSE_CREDENTIAL, CAUSE_REQUEST, Caller, Channel, ModelInfo,
                                      Outcome, PluginContext, Reject, RequestInfo)
from apertis_proxy.gateway.contract import is_claude_model_name
from apertis_proxy.gateway.usage import redact
from apertis_proxy.store.catalog import Catalog
from apertis_proxy.store.channel_health import HealthRow
from apertis_proxy.store.config import ConfigSnapshot
from apertis_proxy.store.service import store_for_plugin

# Outcome.kind -> the option holding its default cooldown.
COOLDOWN_OF_KIND = {
    "exhausted": "cooldown_exhausted",
    "rate_limited": "cooldown_rate_limited",
    "overloaded": "cooldown_overloaded",
    "server_error": "cooldown_server_error",
    "stream_error": "cooldown_server_error",      # a 2xx whose body failed: cut, stalled, in-band error
    "timeout": "cooldown_connect_error",
    "connect_error": "cooldown_connect_error",
}
COOLDOWN_DEFAULTS = {
    "cooldown_rate_limited": 30.0,
    "cooldown_overloaded": 5.0,
    "cooldown_server_error": 10.0,
    "cooldown_connect_error": 15.0,
    "cooldown_exhausted": 3600.0,
}
SESSION_HEADER = "x-claude-code-session-id"
UNKNOWN_CREATED_AT = "1970-01-01T00:00:00Z"
# The longest rest a client is told to sleep through (retry-after): past it, x-should-retry: false.
LONGEST_RETRY_WAIT = 60


def caller_may_use_on(caller: Caller, channel: Channel, model: str) -> bool:
    """May the caller send `model` to this channel?  The allow-list names models;
    on a channel a name means the upstream id it resolves to there."""
    if caller.models is None:
        return True
    upstream = channel.upstream_model(model)
    if upstream in caller.models:
        return True
    return any(channel.upstream_model(name) == upstream for name in caller.models)


def names(channel: Channel, model: str) -> bool:
    """Would the gateway send `model` to this channel it serves?  A Claude name, or
    another vendor's name the channel lists or aliases ("any model" is Claude only)."""
    return (is_claude_model_name(model) or model in channel.aliases
            or (channel.models is not None and model in channel.models))


def session_of(request: RequestInfo, caller: Caller) -> Optional[Hashable]:
    """The affinity key of a request, scoped to the caller's key."""
    sid = request.headers.get(SESSION_HEADER)
    if sid:
        return (caller.key_id, caller.key_name, "session", sid)
    body = request.body
    if isinstance(body, dict):
        metadata = body.get("metadata")
        if isinstance(metadata, dict):
            user = metadata.get("user_id")
            if isinstance(user, str) and user:
                return (caller.key_id, caller.key_name, "user", user)
    return None


def weighted_order(channels: Sequence[Channel], rng: random.Random) -> list[Channel]:
    """A random permutation where each next channel is drawn with probability
    proportional to its weight among those left (Efraimidis-Spirakis keys).
    Weight 0 or less: only after every positively weighted channel."""
    if len(channels) < 2:
        return list(channels)       # the common tier of one: no draw needed
    def key(ch: Channel) -> float:
        if ch.weight <= 0:
            return -rng.random()
        return rng.random() ** (1.0 / ch.weight)
    return sorted(channels, key=key, reverse=True)


class Affinity:
    """A bounded LRU of session -> channel id with a time to live."""

    def __init__(self, ttl: float, max_sessions: int) -> None:
        self.ttl = ttl
        self.max_sessions = max(1, max_sessions)
        self._map: collections.OrderedDict[Hashable, tuple[int, float]] = collections.OrderedDict()

    def get(self, session: Hashable, now: float) -> Optional[int]:
        hit = self._map.get(session)
        if hit is None:
            return None
        if hit[1] <= now:
            del self._map[session]
            return None
        return hit[0]

    def set(self, session: Hashable, channel_id: int, now: float) -> None:
        self._map[session] = (channel_id, now + self.ttl)
        self._map.move_to_end(session)
        while len(self._map) > self.max_sessions:
            self._map.popitem(last=False)

    def __len__(self) -> int:
        return len(self._map)


class ChannelRouter:
    def __init__(self, ctx: PluginContext) -> None:
        opts = ctx.options
        self.ctx = ctx
        self.log = ctx.log
        self.max_attempts = max(1, int(opts.get("max_attempts", opts.get("retry_budget", 3))))
        self.cooldowns = {k: float(opts.get(k, v)) for k, v in COOLDOWN_DEFAULTS.items()}
        self.max_cooldown = float(opts.get("max_cooldown", 600.0))
        self.disable_on = frozenset(int(s) for s in opts.get("disable_on", (401, 403)))
        self.rng = random.Random(opts.get("seed"))
        self.affinity = Affinity(float(opts.get("affinity_ttl", 3600.0)),
                                 int(opts.get("affinity_max_sessions", 100_000)))
        self.channels: list[Channel] = []
        self.disabled: list[Channel] = []            # disabled channels, to tell an outage from an unknown model
        self.catalog = Catalog()
        self.cool_until: dict[int, float] = {}       # channel id -> monotonic deadline
        # Channels this process disabled: id -> monotonic time the write
        # committed (None while writing); kept out of reloads that read older rows.
        self._disabling: dict[int, Optional[float]] = {}
        # request id -> session, so a success can re-pin the session to the
        # channel that served it.
        self._sessions: collections.OrderedDict[str, Hashable] = collections.OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self.worker_name = f"{socket.gethostname()}/{ctx.worker}"
        self.health_delay = max(0.0, float(opts.get("health_write_delay", 0.2)))
        self.health: dict[int, HealthRow] = {}
        self._health_dirty: set[int] = set()
        self._health_task: Optional[asyncio.Task] = None
        self.interval = float(opts.get("poll_interval", 1.0))
        self.store = None
        self._owns_store = False
        self._watcher = None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.store, self._owns_store = await store_for_plugin(self.ctx)
        await self.store.end_channel_cooldowns(self.worker_name)
        self._watcher = self.store.watcher(self.interval)
        await self._watcher.start()
        self._watcher.subscribe(self._reload)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._health_task is not None:
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self._write_health()
        if self._watcher is not None:
            self._watcher.unsubscribe(self._reload)
        if self._owns_store and self.store is not None:
            await self.store.close()

    async def refresh(self) -> None:
        """Reload now if the configuration changed."""
        await self._watcher.refresh()

    # -- request path --------------------------------------------------------

    def is_cooling(self, channel: Channel, now: Optional[float] = None) -> bool:
        until = self.cool_until.get(channel.id)
        return until is not None and until > (time.monotonic() if now is None else now)

    async def route(self, request: RequestInfo, caller: Caller) -> Optional[Sequence[Channel]]:
        model = request.model
        account = getattr(request, "account", None)
        candidates = [c for c in self.channels
                      if (model is None or (c.serves(model) and caller_may_use_on(caller, c, model)))
                      and (account is None or c.account == account)]
        if not candidates:
            # State bound to an account with no enabled channel is a 404 (the gateway's), so
            # that the SDK starts over; otherwise disabled channels mean an outage.
            if model is not None and account is None and self._disabled_serving(model, caller):
                raise Reject(503, "api_error", f"model {model}: every channel serving it is disabled "
                             f"(an upstream outage or the operator's choice); no request can be served now")
            return []
        now = time.monotonic()
        tiers: dict[int, list[Channel]] = {}
        for ch in candidates:
            tiers.setdefault(ch.priority, []).append(ch)
        healthy: list[Channel] = []
        cooling: list[Channel] = []
        for priority in sorted(tiers, reverse=True):
            for ch in weighted_order(tiers[priority], self.rng):
                (cooling if self.is_cooling(ch, now) else healthy).append(ch)
        session = session_of(request, caller)
        if session is not None:
            pinned = self.affinity.get(session, now)
            for i, ch in enumerate(healthy):
                if ch.id == pinned:
                    healthy.insert(0, healthy.pop(i))
                    break
        if not healthy:
            if model is not None and not any(names(c, model) for c in cooling):
                return cooling     # another vendor's name: the gateway refuses it (404), no outage to report
            raise self._all_cooling(model, cooling, now)
        ordered = (healthy + cooling)[: self.max_attempts]
        if session is not None:
            # Pin to the first choice now; a success on another channel re-pins.
            self.affinity.set(session, ordered[0].id, now)
            # A success re-pins the session to the channel that served it (after a failover).
            self._sessions[request.request_id] = session
            while len(self._sessions) > self.affinity.max_sessions:
                self._sessions.popitem(last=False)
        return ordered

    def _disabled_serving(self, model: str, caller: Caller) -> bool:
        return any(c.serves(model) and names(c, model) and caller_may_use_on(caller, c, model)
                   for c in self.disabled)

    def _all_cooling(self, model: Optional[str], cooling: Sequence[Channel], now: float) -> Reject:
        """Every channel serving the model rests: 503 with the earliest return as retry-after
        (the official SDKs retry a 503 and honour retry-after).  A rest longer than a client should sleep
        through (an account at its spend limit rests an hour) also says x-should-retry: false, so the SDKs
        raise at once instead of sleeping the whole wait inside one call."""
        wait = max(1, math.ceil(min(self.cool_until[c.id] for c in cooling) - now))
        causes = sorted({self.health[c.id].cool_cause for c in cooling
                         if c.id in self.health and self.health[c.id].cool_cause} or {"failures"})
        headers = {"retry-after": str(wait)}
        if wait > LONGEST_RETRY_WAIT:
            headers["x-should-retry"] = "false"
        return Reject(503, "overloaded_error",
                      f"model {model or 'requested'}: every channel serving it is cooling down after upstream "
                      f"failures ({', '.join(causes)}); retry in {wait}s", headers)

    def feedback(self, outcome: Outcome) -> None:
        ch = outcome.channel
        request_id = outcome.request_id
        session = self._sessions.pop(request_id, None) if request_id and outcome.ok else None
        if outcome.ok:
            if self.cool_until.pop(ch.id, None) is not None:
                self._health_changed(ch, cool_until=None)
            if session is not None:
                self.affinity.set(session, ch.id, time.monotonic())
            return
        if outcome.cause == CAUSE_REQUEST:
            return
        self._count_failure(ch, outcome)
        if outcome.cause == CAUSE_CREDENTIAL and outcome.status in self.disable_on:
            self._auto_disable(ch, outcome)
            return
        delay = self.cooldown_for(outcome)
        if delay:
            until = time.monotonic() + delay
            self.cool_until[ch.id] = max(until, self.cool_until.get(ch.id, 0.0))
            self._health_changed(ch, cool_until=time.time() + (self.cool_until[ch.id] - time.monotonic()),
                                 cause=outcome.kind)
            self.log.warning("channel %s cools down for %.1fs after %s (%s %s) on request %s", ch.name, delay,
                             outcome.kind, outcome.status or "-", outcome.error_type or "-",
                             request_id or "-")

    def cooldown_for(self, outcome: Outcome) -> Optional[float]:
        """Seconds a channel rests after this failure; None: not the channel's fault."""
        option = COOLDOWN_OF_KIND.get(outcome.kind)
        if option is None:          # the request's fault (400, 404, 413...) or a refused credential
            return None
        if option == "cooldown_exhausted":
            return max(self.cooldowns[option], outcome.retry_after or 0.0)
        delay = outcome.retry_after if outcome.retry_after and outcome.retry_after > 0 else self.cooldowns[option]
        return min(delay, self.max_cooldown)

    # -- health, written for `channels list` ------------------------------------

    def _health_row(self, ch: Channel) -> HealthRow:
        row = self.health.get(ch.id)
        if row is None:
            row = self.health[ch.id] = HealthRow(ch.id, ch.name)
        return row

    def _count_failure(self, ch: Channel, outcome: Outcome) -> None:
        row = self._health_row(ch)
        now = time.time()
        row.count_failure(outcome.kind, now)
        # Messages come redacted from the gateway; redacted again here, as this one is stored.
        message = redact(" ".join((outcome.message or "").split()), ch.api_key)
        status = f"{outcome.status} " if outcome.status is not None else ""
        row.last_error = f"{status}{outcome.error_type or outcome.kind}: {message or 'no message'}"[:300]
        row.last_error_at, row.last_request_id = now, outcome.request_id or None
        self._health_changed(ch)

    def _health_changed(self, ch: Channel, **cooling: Optional[object]) -> None:
        """Note a change of `ch`'s health (`cool_until`, `cause`: its cooldown) and
        schedule one write for the changes of the next health_write_delay seconds."""
        row = self._health_row(ch)
        if "cool_until" in cooling:
            row.cool_until = cooling["cool_until"]   # type: ignore[assignment]
            row.cool_cause = cooling.get("cause")    # type: ignore[assignment]
        self._health_dirty.add(ch.id)
        if self._health_task is None:
            try:
                self._health_task = asyncio.get_running_loop().create_task(self._health_soon())
            except RuntimeError:       # no loop (a unit test calling feedback directly): written at close
                pass

    async def _health_soon(self) -> None:
        try:
            await asyncio.sleep(self.health_delay)
        finally:
            self._health_task = None
        await self._write_health()

    async def _write_health(self) -> None:
        if not self._health_dirty or self.store is None:
            return
        dirty, self._health_dirty = self._health_dirty, set()
        try:
            rows = [self.health[cid] for cid in dirty if cid in self.health]     # removed ones dropped
            await self.store.write_channel_health(self.worker_name, rows)
        except Exception:
            self.log.exception("could not record channel health; retrying with the next change")
            self._health_dirty |= dirty

    def models(self, caller: Caller) -> Sequence[ModelInfo]:
        catalog, channels = self.catalog, self.channels
        found: dict[str, ModelInfo] = {}
        for entry in catalog.entries:
            if any(c.serves(entry.id) and caller_may_use_on(caller, c, entry.id)
                   for c in channels):
                found[entry.id] = entry.info()
        # Names only some channels know: their own aliases and listed models.
        for ch in channels:
            for name in (*ch.aliases, *(ch.models or ())):
                if name in found or name in catalog.by_name:
                    continue
                if ch.serves(name) and caller_may_use_on(caller, ch, name):
                    target = catalog.by_name.get(ch.upstream_model(name))
                    found[name] = (target.info(as_id=name) if target else
                                   ModelInfo(id=name, display_name=name, created_at=UNKNOWN_CREATED_AT))
        return sorted(found.values(), key=lambda m: (m.created_at, m.id), reverse=True)

    # -- auto-disable ----------------------------------------------------------

    def _auto_disable(self, ch: Channel, outcome: Outcome) -> None:
        if ch.id in self._disabling or all(c.id != ch.id for c in self.channels):
            return          # already done by a concurrent request
        self.channels = [c for c in self.channels if c.id != ch.id]
        self.disabled = [*self.disabled, ch]
        self.cool_until.pop(ch.id, None)
        self._health_changed(ch, cool_until=None)
        self._disabling[ch.id] = None
        now = time.time()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        message = " ".join((outcome.message or "").split())[:300]
        reason = (f"upstream {outcome.status} {outcome.error_type or 'error'}: "
                  f"{message or 'no message'} at {stamp}")
        self.log.error("channel %s disabled: %s", ch.name, reason)
        task = asyncio.get_running_loop().create_task(self._write_disabled(ch, reason, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_disabled(self, ch: Channel, reason: str, at: float) -> None:
        for attempt in range(5):
            try:
                # "AND enabled = 1": several workers may see the same 401; the
                # first reason stays.
                await self.store.disable_channel(ch.id, reason, at)
                self._disabling[ch.id] = time.monotonic()
                return
            except Exception:
                self.log.exception("could not record that channel %s is disabled (try %d)",
                                   ch.name, attempt + 1)
                await asyncio.sleep(0.2 * 2 ** attempt)
        # Still kept out of this process's memory until a restart.

    # -- background ----------------------------------------------------------

    def _reload(self, snapshot: ConfigSnapshot) -> None:
        read_at = snapshot.read_at
        catalog = snapshot.catalog
        channels, disabled = list(snapshot.channels), list(snapshot.disabled_channels)
        for cid, committed in list(self._disabling.items()):
            if committed is not None and committed < read_at:
                del self._disabling[cid]     # these rows already say so
        disabled += [c for c in channels if c.id in self._disabling]
        channels = [c for c in channels if c.id not in self._disabling]
        ids = {c.id for c in channels}
        known = ids | {c.id for c in disabled}
        for cid in [cid for cid in self.health if cid not in known]:
            del self.health[cid]         # removed channels
        for cid in [cid for cid in self.cool_until if cid not in ids]:
            del self.cool_until[cid]
        self.catalog, self.channels, self.disabled = catalog, channels, disabled
        self.log.info("loaded %d enabled channels", len(channels))
