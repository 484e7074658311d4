"""The most a request can cost, known before it is sent: what a quota reserves for it.

Tokens: every byte of the request body counts as one input token (no tokenizer
gives more tokens than bytes of text, and images and documents are far larger
in base64 than in tokens), plus ``max_tokens`` of output (thinking included).

Cost: those input tokens at the highest input rate of the model (input, cache
writes of either TTL, cache reads; the highest prompt-size band they could
reach), output at the output rate, times fast mode and the inference geo's
multiplier when the request asks for them, plus web searches up to each web
search tool's ``max_uses`` (DEFAULT_WEB_SEARCHES without one).  Not bounded:
iterations billed beside the request (advisor, fallback), which are rare; a
request using them may overshoot a quota by their cost.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Mapping, Optional

from ..store.catalog import Catalog

MILLION = Decimal(1_000_000)
DEFAULT_WEB_SEARCHES = 10
_INPUT_RATES = ("input", "cache_write_5m", "cache_write_1h", "cache_read")


def token_bound(body: Optional[Mapping[str, Any]], body_bytes: int) -> int:
    max_tokens = body.get("max_tokens") if isinstance(body, Mapping) else None
    out = max_tokens if type(max_tokens) is int and max_tokens > 0 else 0
    return max(0, body_bytes) + out


def cost_bound(catalog: Catalog, model: Optional[str], body: Optional[Mapping[str, Any]], body_bytes: int,
               at: float) -> float:
    """USD; 0 for a model without a price (such a request is refused for a key with a USD quota)."""
    entry = catalog.lookup(model)
    row = entry.price_at(at) if entry is not None else None
    if row is None or not isinstance(body, Mapping):
        return 0.0
    input_tokens = max(0, body_bytes)
    max_tokens = body.get("max_tokens")
    output_tokens = max_tokens if type(max_tokens) is int and max_tokens > 0 else 0
    in_rate = max(row.rates[f] for f in _INPUT_RATES)
    out_rate = row.rates["output"]
    for above, rates in row.bands:
        if input_tokens > above:
            in_rate = max(in_rate, *(rates[f] for f in _INPUT_RATES))
            out_rate = max(out_rate, rates["output"])
    cost = (input_tokens * in_rate + output_tokens * out_rate) / MILLION
    if body.get("speed") == "fast" and entry.fast_multiplier is not None:
        cost *= entry.fast_multiplier
    geo = body.get("inference_geo")
    if isinstance(geo, str) and geo in entry.geo_multipliers:
        cost *= max(Decimal(1), entry.geo_multipliers[geo])
    searches = _web_searches(body.get("tools"))
    if searches and catalog.rates.web_search_per_request is not None:
        cost += searches * catalog.rates.web_search_per_request
    return float(cost)


def _web_searches(tools: Any) -> int:
    if not isinstance(tools, list):
        return 0
    total = 0
    for tool in tools:
        if isinstance(tool, Mapping) and str(tool.get("type", "")).startswith("web_search"):
            uses = tool.get("max_uses")
            total += uses if type(uses) is int and uses > 0 else DEFAULT_WEB_SEARCHES
    return total
