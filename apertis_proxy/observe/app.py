"""Observability of one worker, and the wrapper that puts it around the gateway's application.

The wrapper brackets every request (Recorder.begin/end: in-flight gauge,
duration, request counter, access log) and answers two paths itself:

    GET /metrics   Prometheus text, or OpenMetrics when the Accept header asks for
                   it; only to clients in the `[metrics] allow` networks (loopback
                   by default), others get 403 permission_error
    GET /ready     200 {"status":"ready"}, or 503 {"status":"unavailable","reason":...}
"""
from __future__ import annotations

import ipaddress
import os
import time
from typing import Any, Callable, Optional

import orjson

from ..gateway.client_address import host_of
from ..http.request import Request
from ..http.responder import Responder
from ..plugin_host import PluginHost
from ..settings import Settings
from . import exposition, shared
from .access_log import AccessLog
from .readiness import Readiness, StoreUnreachable
from .recorder import Recorder

_JSON = (b"content-type", b"application/json")
_clock = time.perf_counter     # the recorder's clock (a request's cycle starts here, see Recorder.begin)


def client_ip(client: str) -> Optional[ipaddress._BaseAddress]:
    """The address of a client (a peer "ip:port" or "[v6]:port", or a forwarded bare address);
    None if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(host_of(client))
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


class Observability:
    def __init__(self, settings: Settings, plugins: PluginHost, catalog: Any, store: Any, *,
                 run_dir: Optional[str] = None) -> None:
        self.plugins = plugins
        self.metrics_enabled = settings.metrics_enabled
        self.access_log = AccessLog(settings.log_format) if settings.access_log else None
        # The access log's lines come from the recorder's end of a request: with
        # either on, every request is followed; with both off, none is.
        self.recorder: Optional[Recorder] = None
        if settings.metrics_enabled or self.access_log is not None:
            self.recorder = Recorder(lambda name: name in catalog.catalog.by_name,
                                     per_key=settings.metrics_per_key, log=self.access_log,
                                     count=settings.metrics_enabled)
        self.readiness = Readiness(store, plugins.refusal, self._held)
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in settings.metrics_allow]
        self._channels: list[tuple[str, bool]] = []     # (name, enabled) as the store last gave them
        self.share = (shared.WorkerShare(run_dir, self.snapshot, settings.metrics_flush_interval)
                      if run_dir and settings.metrics_enabled else None)

    def start(self) -> None:
        if self.share is not None:
            self.share.start()

    async def close(self) -> None:
        if self.share is not None:
            await self.share.close()
        if self.access_log is not None:
            self.access_log.close()

    def refused(self, status: int, error_type: str, reason: str, request_id: str, method: Optional[str],
                path: Optional[str], client: str) -> None:
        """A request the HTTP layer answered with an error before the gateway saw it
        (see http/protocol.py RefusalHook): counted by reason and code, and logged."""
        if self.recorder is not None:
            self.recorder.refused(reason, status)
        if self.access_log is not None:
            self.access_log.refused(status, error_type, request_id, method, path, client)

    @property
    def refusal_hook(self) -> Optional[Callable[..., None]]:
        """What the HTTP layer calls for its own refusals; None when nothing observes them."""
        return self.refused if self.recorder is not None else None

    def wrap(self, app: Any) -> "ObservedApp":
        return ObservedApp(app, self)

    def may_scrape(self, client: str) -> bool:
        ip = client_ip(client)
        return ip is not None and any(ip in net for net in self.allowed)

    async def snapshot(self, not_counted: int = 0) -> dict:
        """This worker's figures, with the plugins' (meters' rows, channels' state).
        `not_counted` requests are left out of the in-flight gauge (the scrape asking)."""
        try:
            channels = self._channels = await self.readiness.channels()
        except StoreUnreachable:
            channels = self._channels   # the last the store gave: what the routers still go by
        # Everything else is read after the store's answer, with no wait in between: of two snapshots the one
        # taken later holds the larger counts, and it is the one written to the workers' file last.
        counters: dict = {}
        gauges: dict = {}
        written, pending = [], []
        for name, meter in self.plugins.meters:
            rows_written, rows_pending = getattr(meter, "written", None), getattr(meter, "pending", None)
            if isinstance(rows_written, int):
                written.append([[name], rows_written])
            if isinstance(rows_pending, int):
                pending.append([[name], rows_pending])
        counters["apertis_ledger_rows_written"] = [["meter"], written]
        gauges["apertis_ledger_pending_rows"] = [["meter"], "sum", pending]
        serving = self._serving()
        gauges["apertis_channel_up"] = [["channel"], "min", [
            [[name], int(enabled and (serving is None or name in serving))] for name, enabled in channels]]
        assert self.recorder is not None
        return self.recorder.snapshot(counters, gauges, not_counted)

    def _router_channels(self) -> tuple[Optional[list], Optional[Callable[[Any], bool]]]:
        """The channels the first router that tells holds (enabled and loaded: its `channels`), and its
        `is_cooling` if it has one; (None, None) if no router tells."""
        for _, router in self.plugins.routers:
            channels = getattr(router, "channels", None)
            if isinstance(channels, list):
                is_cooling = getattr(router, "is_cooling", None)
                return channels, is_cooling if callable(is_cooling) else None
        return None, None

    def _held(self) -> Optional[set[str]]:
        """Names of the channels the router holds (for /ready); None if no router tells."""
        channels, _ = self._router_channels()
        return None if channels is None else {c.name for c in channels}

    def _serving(self) -> Optional[set[str]]:
        """Names of the channels the router would send traffic to now (enabled and not cooling down); None if
        no router tells."""
        channels, is_cooling = self._router_channels()
        if channels is None or is_cooling is None:
            return None
        return {c.name for c in channels if not is_cooling(c)}

    # -- endpoints -------------------------------------------------------------
    async def metrics(self, req: Request, resp: Responder) -> None:
        if not self.may_scrape(req.client):
            return resp.send_error(403, "GET /metrics is served only to clients in the networks of "
                                        "[metrics] allow (loopback by default)", "permission_error")
        own = await self.snapshot(not_counted=1)
        snapshots = [(own, True)]
        if self.share is not None:
            self.share.publish(own)         # what this scrape counts stays counted, also if this worker dies
            snapshots += await self.share.fresh_others()
        body, content_type = exposition.render(snapshots, (req.header(b"accept") or b"").decode("latin-1"))
        resp.send(200, [(b"content-type", content_type.encode())], body)

    async def ready(self, req: Request, resp: Responder) -> None:
        problem = await self.readiness.problem()
        if problem is None:
            return resp.send(200, [_JSON], b'{"status":"ready"}')
        resp.send(503, [_JSON], orjson.dumps({"status": "unavailable", "reason": problem}))


class _RefusedFromHead:
    """What the recorder reads of a responder, for a request answered before its body was read."""

    __slots__ = ("status", "request_id")

    def __init__(self, status: int, request_id: str) -> None:
        self.status = status
        self.request_id = request_id


class ObservedApp:
    """`await app(request, responder)`, with every request counted and logged once."""

    def __init__(self, app: Any, observe: Observability) -> None:
        self.app = app
        self.observe = observe
        self.recorder = observe.recorder
        self._own = {"/ready": observe.ready}
        if observe.metrics_enabled:
            self._own["/metrics"] = observe.metrics
        # Behind trusted proxies, the paths answered here judge the client they name too.
        self._client_address = getattr(app, "client_address", None)
        # The HTTP layer's head check (see http/protocol.py), passed through; a
        # request refused from its head is counted and logged too.
        self._check_head = getattr(app, "check_head", None)
        if self._check_head is not None:
            self.check_head = self._check_head if self.recorder is None else self._observed_check_head

    def _observed_check_head(self, head: Request):
        refusal = self._check_head(head)
        if refusal is not None and not isinstance(refusal, int):     # an int is a body limit, not a refusal
            answered = _RefusedFromHead(refusal.status, getattr(head, "request_id", "-"))
            self.recorder.end(answered.request_id, self.recorder.begin(answered.request_id), head, answered)
        return refusal

    async def __call__(self, req: Request, resp: Responder) -> None:
        own = self._own.get(req.path)
        if own is not None and self._client_address is not None:
            req.client = self._client_address.resolve(req.client, req.headers)
        recorder = self.recorder
        if recorder is None:
            return await (self.app(req, resp) if own is None else self._answer(own, req, resp))
        request_id = resp.request_id
        # Recorder.begin(), inline: a call less on every request.
        cycle = recorder.cycles[request_id] = [_clock(), False, 0, None, None]
        recorder.in_flight += 1
        try:
            # The gateway's application awaited directly: a coroutine less per request.
            await (self.app(req, resp) if own is None else self._answer(own, req, resp))
        finally:
            recorder.end(request_id, cycle, req, resp)

    @staticmethod
    async def _answer(own: Any, req: Request, resp: Responder) -> None:
        if req.method not in ("GET", "HEAD"):
            return resp.send_error(405, "method not allowed; use GET, HEAD", "invalid_request_error",
                                   [(b"allow", b"GET, HEAD")])
        await own(req, resp)


def run_dir_for(workers: int) -> Optional[str]:
    """The run directory `serve` made for its workers (None with one worker)."""
    return os.environ.get(shared.RUN_DIR_ENV) if workers > 1 else None
