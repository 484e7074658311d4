"""Loads plugins through entry points and runs their chains with containment.

Plugin failures never take the server down: an exception other than Reject
from auth or router (a CancelledError too, unless the request's task is the
one cancelled: see _plugin_failed) becomes a 500 `api_error` for that request,
a failing meter is logged and the other meters still get the record.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from importlib.metadata import entry_points
from typing import Any, Iterable, Optional, Sequence

from .errors import GatewayError
from .plugin_api import (AUTH_GROUP, METER_GROUP, ROUTER_GROUP, Caller, Channel, ModelInfo, Outcome,
                         PluginContext, Reject, RequestInfo, UsageRecord)
from .settings import Settings
from .store.ledger_spool import default_spool_dir

log = logging.getLogger("apertis_proxy.plugins")
# How long one plugin's close() may take at shutdown before the next is closed.
CLOSE_TIMEOUT = 10.0


class PluginLoadError(RuntimeError):
    pass


def discover(group: str) -> dict[str, Any]:
    """Entry-point name -> EntryPoint for one group."""
    return {ep.name: ep for ep in entry_points(group=group)}


def _unknown(name: str, group: str, available: dict[str, Any]) -> PluginLoadError:
    return PluginLoadError(f"no plugin named {name!r} in entry-point group {group!r} "
                           f"(installed: {', '.join(sorted(available)) or 'none'})")


def _failed(name: str, group: str, stage: str, exc: Exception) -> PluginLoadError:
    """One line for the operator; the traceback, for the plugin's author, at DEBUG."""
    log.debug("plugin %s (%s) failed to %s", name, group, stage, exc_info=exc)
    return PluginLoadError(f"plugin {name!r} ({group}) failed to {stage}: {type(exc).__name__}: {exc} "
                           f"(log_level = \"DEBUG\" shows the traceback)")


def check_names(settings: Settings) -> None:
    """Raise PluginLoadError for a configured plugin no entry point provides.
    Cheap (nothing is imported); run before forking workers, whose own errors
    would only show as an exit status."""
    for group, names in ((AUTH_GROUP, settings.auth_plugins), (ROUTER_GROUP, settings.router_plugins),
                         (METER_GROUP, settings.meter_plugins)):
        available = discover(group)
        for name in names:
            if name not in available:
                raise _unknown(name, group, available)


def budget_options(settings: Settings) -> dict[str, Any]:
    """The [budgets] settings, handed to every plugin as options (the keys plugin acts on them)."""
    if settings.budget_webhook_url is None:
        return {}
    return {"budget_webhook_url": settings.budget_webhook_url,
            "budget_thresholds": list(settings.budget_thresholds),
            "budget_webhook_attempts": settings.budget_webhook_attempts,
            "budget_webhook_backoff": settings.budget_webhook_backoff}


def limits_options(settings: Settings) -> dict[str, Any]:
    """The [limits] settings, handed to every plugin as options (the keys plugin acts on them)."""
    return {"limits_lease_seconds": settings.limits_lease_seconds,
            "limits_on_store_down": settings.limits_on_store_down}


def _load(group: str, names: Iterable[str], settings: Settings, worker: int, workers: int,
          store: Any = None) -> list:
    available = discover(group)
    plugins = []
    for name in names:
        ep = available.get(name)
        if ep is None:
            raise _unknown(name, group, available)
        ledger = _ledger_options(settings) if group == METER_GROUP else {}
        options = {"poll_interval": settings.config_poll_interval, **budget_options(settings),
                   **limits_options(settings), **ledger,
                   **settings.plugin_options.get(name, {})}
        ctx = PluginContext(name=name, options=options,
                            db_path=settings.db, log=logging.getLogger(f"apertis_proxy.plugin.{name}"),
                            worker=worker, workers=workers, meters=tuple(settings.meter_plugins),
                            store=store)
        try:
            plugin = ep.load()(ctx)
        except Exception as exc:  # noqa: BLE001 - the plugin's own failure, reported in one line
            raise _failed(name, group, "load", exc) from exc
        plugins.append((name, plugin))
    return plugins


def _ledger_options(settings: Settings) -> dict[str, Any]:
    """The [ledger] spool settings, handed to meters as options."""
    return {"spool_dir": settings.spool_dir or default_spool_dir(settings.db),
            "spool_max_bytes": settings.spool_max_bytes, "spool_warn_bytes": settings.spool_warn_bytes,
            "fsync": settings.ledger_fsync}


class NoObserver:
    """What the chains tell about each request when nobody observes them (see observe/recorder.py)."""

    def routed(self, request: RequestInfo) -> None:
        pass

    def attempt(self, outcome: Outcome) -> None:
        pass

    def finished(self, record: UsageRecord) -> None:
        pass


class PluginHost:
    def __init__(self, auth: list, routers: list, meters: list) -> None:
        self.auth = auth          # [(name, plugin)]
        self.routers = routers
        self.meters = meters
        # Sees every request routed, every attempt's outcome and every finished
        # record, beside the plugins (metrics, access log).
        self.observer: Any = NoObserver()
        self._finishers = [(n, p) for n, p in auth if callable(getattr(p, "finish", None))]
        self._feedback = [(n, p) for n, p in routers if callable(getattr(p, "feedback", None))]
        # Meters that may refuse new requests: (message, retry-after seconds) or None.
        self._refusals = [p.refusal for _, p in meters if callable(getattr(p, "refusal", None))]
        self._checkpoints = [(n, p.checkpoint) for n, p in meters if callable(getattr(p, "checkpoint", None))]
        self._sent = [(n, p.sent) for n, p in meters if callable(getattr(p, "sent", None))]

    @property
    def checkpoints(self) -> bool:
        """Whether any meter keeps running requests (sent(), checkpoint())."""
        return bool(self._checkpoints or self._sent)

    @classmethod
    def load(cls, settings: Settings, *, worker: int = 0, workers: int = 1, store: Any = None) -> "PluginHost":
        return cls(_load(AUTH_GROUP, settings.auth_plugins, settings, worker, workers, store),
                   _load(ROUTER_GROUP, settings.router_plugins, settings, worker, workers, store),
                   _load(METER_GROUP, settings.meter_plugins, settings, worker, workers, store))

    def _all(self) -> list[tuple[str, str, Any]]:
        """(group, name, plugin) of every plugin, in load order."""
        return [(group, name, plugin) for group, chain in
                ((AUTH_GROUP, self.auth), (ROUTER_GROUP, self.routers), (METER_GROUP, self.meters))
                for name, plugin in chain]

    async def start(self) -> None:
        for group, name, plugin in self._all():
            start = getattr(plugin, "start", None)
            if start is None:
                continue
            try:
                result = start()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # noqa: BLE001 - reported in one line, as a load failure
                raise _failed(name, group, "start", exc) from exc

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close every plugin, last loaded first; one that fails or takes longer
        than `timeout` is logged and left, so the ones after it (the meter's
        final flush) still close."""
        for _, name, plugin in reversed(self._all()):
            close = getattr(plugin, "close", None)
            if close is None:
                continue
            try:
                result = close()
                if inspect.isawaitable(result):
                    async with asyncio.timeout(timeout):
                        await result
            except TimeoutError:
                log.error("plugin %s did not close within %gs; left behind", name, timeout)
            except Exception:  # noqa: BLE001
                log.exception("plugin %s failed to close", name)

    def refusal(self) -> Optional[tuple[str, int]]:
        """Why new requests are refused now (a meter that cannot take rows), with a retry-after; None when
        they are admitted.  For /ready: authenticate() runs the same loop inline (a call less a request)."""
        for refusal in self._refusals:
            refused = refusal()
            if refused is not None:
                return refused
        return None

    # -- chains --------------------------------------------------------------
    # The two decision chains loop inline: a shared helper taking a lambda cost
    # two more frames and a closure per request each (callgrind).
    async def authenticate(self, request: RequestInfo) -> tuple[Caller, Any]:
        """The caller and the plugin that vouched for it (for finish()).
        The first non-None answer wins; Reject becomes the client's error.
        A meter that cannot take more rows (its `refusal()`) refuses the request first."""
        for refusal in self._refusals:
            refused = refusal()
            if refused is not None:
                raise GatewayError(503, refused[0], "overloaded_error", {"retry-after": str(refused[1])})
        for name, plugin in self.auth:
            try:
                caller = await plugin.authenticate(request)
            except BaseException as exc:
                if not _plugin_failed(exc):
                    raise
                raise _chain_error("auth", name, exc) from None
            if caller is not None:
                if not isinstance(caller, Caller):
                    raise _chain_error("auth", name, TypeError(
                        f"authenticate() returned {type(caller).__name__}, not a Caller or None"))
                return caller, plugin
        raise GatewayError(401, "invalid x-api-key", "authentication_error")

    async def admit(self, plugin: Any, request: RequestInfo, caller: Caller) -> Caller:
        """The vouching plugin's admit(), once the request is checked and routed (see AuthPlugin): the
        caller its release() and finish() get.  Reject becomes the client's error."""
        admit = getattr(plugin, "admit", None)
        if admit is None:
            return caller
        try:
            admitted = await admit(request, caller)
        except BaseException as exc:
            if not _plugin_failed(exc):
                raise
            raise _chain_error("auth", self._name_of(plugin), exc) from None
        if not isinstance(admitted, Caller):
            raise _chain_error("auth", self._name_of(plugin), TypeError(
                f"admit() returned {type(admitted).__name__}, not a Caller"))
        return admitted

    def _name_of(self, plugin: Any) -> str:
        return next((name for name, p in self.auth if p is plugin), type(plugin).__name__)

    def check_head(self, request: RequestInfo) -> bool:
        """Raise GatewayError when the request head alone shows that no auth
        plugin will admit it (see AuthPlugin.check_head).  True: a plugin vouched
        for the credential; False: a plugin without the hook, which may admit
        anything, ended the check unvouched."""
        for name, plugin in self.auth:
            check = getattr(plugin, "check_head", None)
            if check is None:
                return False
            try:
                if check(request):
                    return True
            except Exception as exc:  # noqa: BLE001 - contained, see _chain_error
                raise _chain_error("auth", name, exc) from None
        raise GatewayError(401, "invalid x-api-key", "authentication_error")

    async def release(self, plugin: Any, caller: Caller, record: UsageRecord) -> None:
        """The vouching plugin's release(), before the answer's last bytes (see AuthPlugin)."""
        release = getattr(plugin, "release", None)
        if release is None:
            return
        try:
            await release(caller, record)
        except BaseException as exc:
            if not _plugin_failed(exc):
                raise
            log.exception("auth plugin release() failed")

    async def finish(self, plugin: Any, caller: Caller, record: UsageRecord) -> None:
        # Every record reaches finish() (metered requests and model listings),
        # priced; the meters have had it already (see MessagesForwarder.handle).
        self.observer.finished(record)
        finish = getattr(plugin, "finish", None)
        if finish is None:
            return
        try:
            await finish(caller, record)
        except BaseException as exc:
            if not _plugin_failed(exc):
                raise
            log.exception("auth plugin finish() failed")

    async def route(self, request: RequestInfo, caller: Caller) -> Optional[Sequence[Channel]]:
        self.observer.routed(request)
        for name, plugin in self.routers:
            try:
                channels = await plugin.route(request, caller)
            except BaseException as exc:
                if not _plugin_failed(exc):
                    raise
                raise _chain_error("router", name, exc) from None
            if channels is not None:
                if not isinstance(channels, (list, tuple)) or not all(isinstance(c, Channel) for c in channels):
                    raise _chain_error("router", name, TypeError(
                        f"route() returned {type(channels).__name__}, not a list of Channel or None"))
                return channels
        return None

    def feedback(self, outcome: Outcome, health: bool = True) -> None:
        """An attempt's outcome, to the metrics and (with `health`) to the routers' channel health."""
        self.observer.attempt(outcome)
        if not health:
            return
        for name, plugin in self._feedback:
            try:
                plugin.feedback(outcome)
            except Exception:  # noqa: BLE001
                log.exception("router plugin %s feedback() failed", name)

    def models(self, caller: Caller) -> list[ModelInfo]:
        seen: dict[str, ModelInfo] = {}
        for name, plugin in self.routers:
            fn = getattr(plugin, "models", None)
            if fn is None:
                continue
            try:
                for m in fn(caller):
                    seen.setdefault(m.id, m)
            except Exception:  # noqa: BLE001
                log.exception("router plugin %s models() failed", name)
        return list(seen.values())

    def sent(self, record: UsageRecord) -> None:
        """The request is about to go upstream, to the meters that note it (MeterPlugin.sent)."""
        _call_each(self._sent, record, "sent")

    def checkpoint(self, record: UsageRecord) -> None:
        """A running request's usage so far, priced, to the meters that keep it (MeterPlugin.checkpoint),
        flagged interrupted for the call: the row as it stands if the gateway dies before the end."""
        interrupted, record.interrupted = record.interrupted, True
        try:
            _call_each(self._checkpoints, record, "checkpoint")
        finally:
            record.interrupted = interrupted

    async def meter(self, record: UsageRecord) -> None:
        """Every meter gets the record, also when one fails or the request's task is cancelled meanwhile
        (the cancellation is raised once they all had it)."""
        cancelled: Optional[asyncio.CancelledError] = None
        for name, plugin in self.meters:
            try:
                await plugin.record(record)
            except BaseException as exc:
                if _plugin_failed(exc):
                    log.exception("meter plugin %s failed to record %s", name, record.request_id)
                elif isinstance(exc, asyncio.CancelledError):
                    cancelled = exc
                else:
                    raise
        if cancelled is not None:
            raise cancelled


def _plugin_failed(exc: BaseException) -> bool:
    """Whether `exc`, out of a plugin's method, is the plugin's own failure: any Exception, and a
    CancelledError while the running task is not being cancelled (something the plugin awaited was
    cancelled), not a cancellation of the request."""
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and task.cancelling() == 0
    return False


def _call_each(hooks: list, record: UsageRecord, hook: str) -> None:
    """Each meter's synchronous hook with the record; a failure is logged and contained."""
    for name, call in hooks:
        try:
            call(record)
        except Exception:  # noqa: BLE001
            log.exception("meter plugin %s failed in %s() for %s", name, hook, record.request_id)


def _chain_error(kind: str, name: str, exc: BaseException) -> GatewayError:
    """What a decision plugin's failure (see _plugin_failed) becomes: its Reject,
    as the client's error; anything else is logged and contained as a 500."""
    if isinstance(exc, Reject):
        if isinstance(exc.status, int) and 400 <= exc.status <= 599:
            return GatewayError(exc.status, exc.message, exc.error_type, exc.headers)
        exc = ValueError(f"Reject with status {exc.status!r}; an error status is 400..599")
    log.error("%s plugin %s failed", kind, name, exc_info=exc)
    return GatewayError(500, f"{kind} failed inside the gateway", "api_error")
