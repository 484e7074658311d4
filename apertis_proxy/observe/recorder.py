"""This process's figures: counters, histograms and gauges kept in plain dicts.

The request path calls `begin()` (observe/app.py does its work inline) and
`end()` around every request and, through the plugin host, `routed()`,
`attempt()` and `finished()` in between; `end()` also notes the request for
the access log.  Each is
a few dictionary updates: prometheus_client's own metric objects cost ~30 us
per request here (labels() lookups, a lock and, across workers, an mmap write
per value), several times the whole budget.  `snapshot()` hands the figures to
the exposition (and, with --workers, to the other workers) as plain data.

Label values come from bounded sets, so a client cannot create series at will:
an endpoint the gateway does not serve is `other`, a model name neither the
catalogue knows nor a channel has answered 2xx for is `other`, a request that
reached no channel has channel `none`.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Callable, Optional

from ..http import fast_head
from ..plugin_api import TOKEN_COUNTS, Outcome, RequestInfo, UsageRecord, billed_apart
from .access_log import FLUSH_LINES, MAX_TEMPLATE_CHARS, AccessLog

# Seconds.  Requests range from a cached count_tokens to streams of many minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# Cost is counted in whole units of 1e-10 USD, the ledger's precision, so sums are exact.
COST_UNIT = 1e-10
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")
ENDPOINTS = frozenset(("/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/v1/messages/batches",
                       "/v1/files", "/health", "/healthz", "/ready", "/metrics"))
# Paths under a collection are counted under it (one label per endpoint, not per item).
_COLLECTIONS = ("/v1/models", "/v1/messages/batches", "/v1/files")
# Model names learned from a channel's 2xx (names the catalogue does not know):
# bounded by what upstreams accept, and capped besides.
MAX_LEARNED_MODELS = 1000
NONE = "none"
OTHER = "other"

_clock = time.perf_counter


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    for collection in _COLLECTIONS:
        if path.startswith(collection) and path[len(collection):len(collection) + 1] == "/":
            return collection
    return OTHER


def outcome_label(outcome: Outcome) -> str:
    """ok, timeout (no answer in time, or a 2xx body that stalled), refused (no connection), or status (an
    error answer; it becomes failover once the next channel is tried).  The fifth, abandoned,
    is an attempt that was still running when the client left (see end())."""
    if outcome.ok:
        return "ok"
    if outcome.status is None:
        return "timeout" if outcome.error_type == "timeout" else "refused"
    if outcome.status < 300 and outcome.error_type == "timeout_error":
        return "timeout"        # a 2xx whose body stalled past read_timeout
    return "status"


class Histogram:
    """Per label tuple: one count per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[tuple, list] = {}

    def counts(self, labels: tuple) -> list:
        """The counts of one label tuple (made on first use): a shape holds on to them."""
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        return counts

    def observe(self, labels: tuple, value: float) -> None:
        counts = self.counts(labels)
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value


# One request while it runs, what the hooks learn about it before it ends: a list (a list display
# costs a fraction of a constructor call, and begin() is on every request's path), indexed
#   0 T0        perf_counter time of begin()
#   1 STREAM    True once routed() saw a stream (it counts in streams_open until end())
#   2 OUTCOMES  attempts with an outcome so far
#   3 RECORD    the UsageRecord finished() saw, or None
#   4 FAILED    the channel of the last attempt that got an error status: `failover` if
#               another attempt follows, `status` if the request ends there; or None
Cycle = list


class Shape:
    """What one kind of request moves and writes: the series of the same endpoint, model,
    channel, code and stream (and key, with per-key labels), and with the access log on the
    pieces of its lines (the same method, path, models, attempts, error type...).  Looked up
    once per request by the raw facts, so the labels, the dictionary entries they select and
    the text around a line's figures are worked out once per kind."""

    __slots__ = ("requests", "usage", "duration", "line")

    def __init__(self, requests: Optional[list[int]], usage: Optional[list[int]], duration: Optional[list],
                 line: Optional[tuple[str, ...]]) -> None:
        self.requests = requests        # [count]; None with metrics off
        self.usage = usage              # [input, output, cache_read, cache_write, cost units]; None: no record
        self.duration = duration        # the request duration histogram's counts
        self.line = line                # the access log's pieces (AccessLog.pieces); None with the log off


# Kinds of request remembered (a shape whose model label is `other` is never remembered: the name may be learned;
# with the access log on, paths and the other facts of its lines are part of the kind too).
MAX_SHAPES = 4096


class Recorder:
    def __init__(self, known_model: Callable[[str], bool], *, per_key: bool = False,
                 log: Optional[AccessLog] = None, count: bool = True) -> None:
        self._known_model = known_model
        self.per_key = per_key
        # False with metrics off: requests are only followed for the access log.
        self.count = count
        # The access log: end() leaves each request in its `pending` list.
        self.log = log
        self.cycles: dict[str, Cycle] = {}
        # Model names already reported as themselves (the catalogue's, and those a channel answered 2xx for).
        self.learned_models: set[str] = set()
        self.requests: dict[tuple, list[int]] = {}  # endpoint, model, channel, code (an int)[, key] -> [count]
        # model[, key] -> [input, output, cache_read, cache_write tokens, cost in units of COST_UNIT]
        self.usage: dict[tuple, list[int]] = {}
        self.attempts: dict[tuple, list[int]] = {}  # channel, outcome -> [count]
        self.refusals: dict[tuple, int] = {}        # reason, code (a str): refused by the HTTP layer
        self.duration = Histogram(DURATION_BUCKETS)             # endpoint, stream
        self.ttfb = Histogram(TTFB_BUCKETS)                     # channel (streams)
        self.upstream_duration = Histogram(DURATION_BUCKETS)    # channel
        self.in_flight = 0
        self.streams_open = 0
        self._shapes: dict[tuple, Shape] = {}
        # channel -> (its `ok` attempt count, its upstream duration counts): the common attempt in one look-up
        self._ok_attempts: dict[str, tuple[list[int], list]] = {}

    # -- hooks on the request path --------------------------------------------
    def begin(self, request_id: str) -> Cycle:
        """A request's cycle starts (ObservedApp.__call__ repeats these lines: a call less a request)."""
        cycle = self.cycles[request_id] = [_clock(), False, 0, None, None]
        self.in_flight += 1
        return cycle

    def routed(self, info: RequestInfo) -> None:
        """A request about to go upstream: a stream is open from here to its end."""
        if info.stream and self.count and info.path == "/v1/messages":
            cycle = self.cycles.get(info.request_id)
            if cycle is not None and not cycle[1]:      # STREAM
                cycle[1] = True
                self.streams_open += 1

    def attempt(self, outcome: Outcome) -> None:
        if not self.count:
            return
        channel = outcome.channel.name
        cycle = self.cycles.get(outcome.request_id)
        if cycle is not None:
            cycle[2] += 1                                   # OUTCOMES
            if cycle[4] is not None:                        # FAILED
                self._count_attempt(cycle[4], "failover")
                cycle[4] = None
        if outcome.ok:
            ok = self._ok_attempts.get(channel)
            if ok is None:
                ok = self._ok_attempts[channel] = (self._attempt_count(channel, "ok"),
                                                   self.upstream_duration.counts((channel,)))
            ok[0][0] += 1
            counts = ok[1]
            counts[bisect_left(DURATION_BUCKETS, outcome.duration)] += 1
            counts[-1] += outcome.duration
            return
        label = outcome_label(outcome)
        if label == "status" and cycle is not None:
            cycle[4] = channel                              # FAILED
        else:
            self._count_attempt(channel, label)
        self.upstream_duration.observe((channel,), outcome.duration)

    def finished(self, record: UsageRecord) -> None:
        cycle = self.cycles.get(record.request_id)
        if cycle is not None:
            cycle[3] = record                               # RECORD

    def end(self, request_id: str, cycle: Cycle, req: Any, resp: Any) -> None:
        """The request is over: count it once, with what the hooks learned, and note it for the log."""
        now = _clock()
        t0, stream, outcomes, record, failed = cycle
        seconds = now - t0
        self.cycles.pop(request_id, None)
        self.in_flight -= 1
        path = req.path
        status = (resp.status if record is None else record.status or resp.status) or _no_status(record)
        log = self.log
        # The kind of request: what its series and (with the log on) its line's pieces depend on.
        if record is None:
            fact = (path, None if log is None else req.method, status, stream)
        elif log is not None:
            fact = (path, req.method, status, stream, record.requested_model, record.channel_name,
                    record.key_name, record.upstream_model, record.attempts, record.error_type, record.stream)
        else:
            fact = (path, None, status, stream, record.requested_model or record.upstream_model,
                    record.channel_name, record.key_name if self.per_key else None)
        shape = self._shapes.get(fact)
        if shape is None:
            shape = self._shape(fact, req.method, status, stream, record)
        if self.count:
            shape.requests[0] += 1                                  # type: ignore[index]
            counts = shape.duration
            counts[bisect_left(DURATION_BUCKETS, seconds)] += 1     # type: ignore[index]
            counts[-1] += seconds                                   # type: ignore[index]
            if record is not None:
                usage = shape.usage
                usage[0] += record.input_tokens                     # type: ignore[index]
                usage[1] += record.output_tokens                    # type: ignore[index]
                usage[2] += record.cache_read_input_tokens          # type: ignore[index]
                usage[3] += record.cache_creation_input_tokens      # type: ignore[index]
                if record.cost:
                    usage[4] += round(record.cost / COST_UNIT)      # type: ignore[index]
                if record.iterations:
                    _add_iteration_tokens(usage, record.iterations)  # type: ignore[arg-type]
                if record.attempts > outcomes and record.channel_name and record.error_type != "gateway_stopped":
                    # The client left while this channel was answering: no outcome came; an error
                    # answer before it was not passed on (another channel was tried).  (One shutdown
                    # cut is no attempt's outcome.)
                    self._count_attempt(record.channel_name, "abandoned")
                    if failed is not None:
                        self._count_attempt(failed, "failover")
                        failed = None
                if stream and record.ttfb_ms is not None:
                    self.ttfb.observe((record.channel_name or NONE,), record.ttfb_ms / 1000)
            if stream:
                self.streams_open -= 1
            if failed is not None:
                self._count_attempt(failed, "status")
        if log is not None:
            pending = log.pending
            pending.append((shape.line, now, seconds, req.client, request_id, record))
            if len(pending) == 1:
                log.arm()
            elif len(pending) >= FLUSH_LINES:
                log.flush()

    def refused(self, reason: str, status: int) -> None:
        """A request the HTTP layer refused before the gateway saw it (no begin/end)."""
        key = (reason, str(status))
        self.refusals[key] = self.refusals.get(key, 0) + 1

    # -- helpers ---------------------------------------------------------------
    def _shape(self, fact: tuple, method: Optional[str], status: int, stream: bool,
               record: Optional[UsageRecord]) -> Shape:
        """What a kind of request not seen yet moves and writes (remembered unless its model is
        `other`, or its line's pieces are too long to keep)."""
        path = fact[0]
        line = None if self.log is None else self.log.pieces(method, path, status, record)
        remember = line is None or len(line[3]) <= MAX_TEMPLATE_CHARS
        if not self.count:
            shape = Shape(None, None, None, line)
        else:
            endpoint = endpoint_label(path)     # a bounded set, unlike paths
            model = NONE if record is None else self._model_label(record)
            channel = (record and record.channel_name) or NONE
            key_labels = (((record and record.key_name) or NONE),) if self.per_key else ()
            labels = (endpoint, model, channel, status, *key_labels)
            requests = self.requests.get(labels)
            if requests is None:
                requests = self.requests[labels] = [0]
            usage = None
            if record is not None:
                usage = self.usage.get((model, *key_labels))
                if usage is None:
                    usage = self.usage[(model, *key_labels)] = [0, 0, 0, 0, 0]
            shape = Shape(requests, usage, self.duration.counts((endpoint, "true" if stream else "false")), line)
            remember = remember and model != OTHER
        if remember:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            self._shapes[fact] = shape
        return shape

    def _attempt_count(self, channel: str, outcome: str) -> list[int]:
        key = (channel, outcome)
        count = self.attempts.get(key)
        if count is None:
            count = self.attempts[key] = [0]
        return count

    def _count_attempt(self, channel: str, outcome: str) -> None:
        self._attempt_count(channel, outcome)[0] += 1

    def _model_label(self, record: UsageRecord) -> str:
        """The model asked for; a batch, which names no model of its own, by the model its results name."""
        name = record.requested_model or record.upstream_model
        if name in self.learned_models:
            return name         # type: ignore[return-value]
        if not name:
            return NONE
        if self._known_model(name):
            if len(self.learned_models) < MAX_LEARNED_MODELS:
                self.learned_models.add(name)   # catalogue names too: one set lookup next time
            return name
        if (record.status < 400 and record.reached_upstream and record.error_type is None
                and len(self.learned_models) < MAX_LEARNED_MODELS):
            self.learned_models.add(name)      # a channel accepted it: a real model
            return name
        return OTHER

    # -- figures ---------------------------------------------------------------
    def snapshot(self, counters: Optional[dict] = None, gauges: Optional[dict] = None, not_counted: int = 0) -> dict:
        """Everything counted so far, as JSON-able data (see exposition.py for the
        shape), with `counters` and `gauges` kept elsewhere (plugins' figures).
        `not_counted` requests are left out of the in-flight gauge (the scrape asking)."""
        key = ["key"] if self.per_key else []
        requests = [[[endpoint, model, channel, str(code), *rest], n[0]]
                    for (endpoint, model, channel, code, *rest), n in self.requests.items()]
        tokens = [[[model, kind, *rest], usage[i]] for (model, *rest), usage in self.usage.items()
                  for i, kind in enumerate(TOKEN_TYPES)]
        cost = [[list(labels), usage[4]] for labels, usage in self.usage.items()]
        return {
            "counters": {
                "apertis_requests": [["endpoint", "model", "channel", "code"] + key, requests],
                "apertis_tokens": [["model", "type"] + key, tokens],
                "apertis_cost_usd": [["model"] + key, cost],
                "apertis_upstream_attempts": [["channel", "outcome"],
                                              [[list(labels), n[0]] for labels, n in self.attempts.items()]],
                "apertis_http_refusals": [["reason", "code"], _series(self.refusals)],
                "apertis_http_heads": [["side", "parser"], fast_head.COUNTS.series()],
                **(counters or {}),
            },
            "histograms": {
                "apertis_request_duration_seconds": [["endpoint", "stream"], list(self.duration.bounds),
                                                     _series(self.duration.series)],
                "apertis_time_to_first_byte_seconds": [["channel"], list(self.ttfb.bounds),
                                                       _series(self.ttfb.series)],
                "apertis_upstream_duration_seconds": [["channel"], list(self.upstream_duration.bounds),
                                                      _series(self.upstream_duration.series)],
            },
            "gauges": {
                "apertis_requests_in_flight": [[], "sum", [[[], self.in_flight - not_counted]]],
                "apertis_streams_open": [[], "sum", [[[], self.streams_open]]],
                **(gauges or {}),
            },
        }


def _series(values: dict[tuple, Any]) -> list:
    return [[list(labels), value] for labels, value in values.items()]


def _no_status(record: Optional[UsageRecord]) -> int:
    """The code of a request that ended with no status: 0 when shutdown's deadline cut it before anything was
    answered (its ledger row says 0 too), else 500 (the server's own failure)."""
    return 0 if record is not None and record.error_type == "gateway_stopped" else 500


def _add_iteration_tokens(usage: list, iterations: list) -> None:
    """The tokens of the iterations billed apart from the top-level counts (advisor, compaction, fallback:
    UsageRecord.billed_tokens), by type, under the request's model as its cost is."""
    for it in billed_apart(iterations):
        for i, name in enumerate(TOKEN_COUNTS):
            value = it.get(name)
            if type(value) is int and value > 0:
                usage[i] += value
