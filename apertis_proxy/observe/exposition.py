"""The figures of one or more workers as one Prometheus (or OpenMetrics) page.

A snapshot (Recorder.snapshot) is plain data:

    {"counters":   {name: [label names, [[label values, value], ...]]},
     "histograms": {name: [label names, bounds, [[label values, [count per bucket..., +Inf count, sum]], ...]]},
     "gauges":     {name: [label names, "sum" | "min", [[label values, value], ...]]}}

Counters and histograms are summed over every snapshot, those of workers that
have ended included: a replaced worker's counts stay in the total.  Gauges
describe the present, so only live workers' count: summed, or their minimum
(a channel is up when every worker would send it traffic).
"""
from __future__ import annotations

import platform
from typing import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from .. import __version__
from .recorder import COST_UNIT

HELP = {
    "apertis_requests": "Requests answered, by endpoint, model as the client asked, channel and status code.",
    "apertis_tokens": "Tokens used, by model and type (input, output, cache_read, cache_write), as metered.",
    "apertis_cost_usd": "Cost in USD, by model, as metered.",
    "apertis_upstream_attempts": "Attempts on upstream channels, by outcome: ok, failover (an error answer after "
                                 "which the next channel was tried), timeout, refused (no connection), status "
                                 "(an error answer passed on), abandoned (the client left while it ran).",
    "apertis_http_refusals": "Requests the HTTP layer answered with an error before the gateway saw them (not in "
                             "apertis_requests_total), by reason: malformed, framing (ambiguous body framing), "
                             "headers_too_large, body_too_large, http_version, timeout (the request did not arrive "
                             "in time), connection_cap (every connection busy), and status code.",
    "apertis_http_heads": "HTTP heads parsed, by side (request: from clients, response: from upstreams) and parser "
                          "(fast: the strict parser of well-formed heads, h11: everything else).",
    "apertis_ledger_rows_written": "Usage rows the meter has written.",
    "apertis_request_duration_seconds": "Time from a request's whole arrival (its body read) to its end.",
    "apertis_time_to_first_byte_seconds": "Streams: time from sending a request upstream to the first byte of "
                                          "the answer that was passed on.",
    "apertis_upstream_duration_seconds": "Duration of one upstream attempt, by channel.",
    "apertis_requests_in_flight": "Requests being handled.",
    "apertis_streams_open": "Streaming requests being handled.",
    "apertis_channel_up": "1 if the channel takes traffic, 0 if it is cooling down or disabled.",
    "apertis_ledger_pending_rows": "Usage rows waiting to be written.",
}
SCALE = {"apertis_cost_usd": COST_UNIT}


class SnapshotCollector:
    """A prometheus_client collector over snapshots: [(snapshot, live)]."""

    def __init__(self, snapshots: Iterable[tuple[dict, bool]]) -> None:
        self.snapshots = list(snapshots)

    def collect(self) -> Iterator:
        info = GaugeMetricFamily("apertis_build_info", "The gateway's version and Python's.",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield from self._counters()
        yield from self._histograms()
        yield from self._gauges()

    def _merged(self, kind: str, live_only: bool = False) -> dict[str, tuple[list, dict]]:
        merged: dict[str, tuple[list, dict]] = {}
        for snapshot, live in self.snapshots:
            if live_only and not live:
                continue
            for name, entry in snapshot.get(kind, {}).items():
                values = merged.setdefault(name, (entry[:-1], {}))[1]
                for label_values, value in entry[-1]:
                    values.setdefault(tuple(label_values), []).append(value)
        return merged

    def _counters(self) -> Iterator:
        for name, (head, values) in self._merged("counters").items():
            family = CounterMetricFamily(name, HELP.get(name, name), labels=head[0])
            scale = SCALE.get(name, 1)
            for label_values, parts in sorted(values.items()):
                family.add_metric(list(label_values), sum(parts) * scale)
            yield family

    def _histograms(self) -> Iterator:
        for name, (head, values) in self._merged("histograms").items():
            labels, bounds = head
            family = HistogramMetricFamily(name, HELP.get(name, name), labels=labels)
            for label_values, parts in sorted(values.items()):
                counts = [sum(column) for column in zip(*parts)]
                total, buckets = 0, []
                for bound, count in zip([*bounds, float("inf")], counts):
                    total += count
                    buckets.append((floatToGoString(bound), total))
                family.add_metric(list(label_values), buckets, counts[-1])
            yield family

    def _gauges(self) -> Iterator:
        for name, (head, values) in self._merged("gauges", live_only=True).items():
            labels, how = head
            family = GaugeMetricFamily(name, HELP.get(name, name), labels=labels)
            combine = min if how == "min" else sum
            for label_values, parts in sorted(values.items()):
                family.add_metric(list(label_values), combine(parts))
            yield family


def render(snapshots: Iterable[tuple[dict, bool]], accept: str) -> tuple[bytes, str]:
    """(page, content type): OpenMetrics when `accept` asks for it, else Prometheus text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
