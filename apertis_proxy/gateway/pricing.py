"""The price of one request: its usage times the catalogue's rates, in exact decimals.

What is billed (USD per million tokens unless said otherwise):
- input, output and cache reads at the model's rates in force when the
  request started (a later price change never reprices it);
- cache writes split by TTL from the final counts: 1 h = min(ephemeral_1h,
  total), the rest at the 5 m rate;
- prompt-size bands: above a band's threshold (input + cache reads + cache
  writes) the whole request takes the band's rates;
- multipliers on all token charges: `speed: "fast"` (the model's fast
  multiplier), `inference_geo` (the model's multiplier for that geo, if any),
  `service_tier` (the catalogue's multiplier: batch 0.5; priority is recorded,
  billed at list price; standard, or none reported, at list price);
- web searches at the per-request price; web fetches are recorded, not charged;
- beta `usage.iterations[]`: advisor, compaction and fallback iterations are
  billed outside the top-level counts, each at its own model's rates (a
  compaction at the request's model), that model's multiplier for the
  request's `inference_geo` (inference ran there too) and the service tier's
  multiplier; `message` iterations are inside the top-level counts.

A request whose usage needs a price the catalogue lacks gets cost None
(unpriced), never 0 nor the list price: a model, fast multiplier, server
tool, service tier or iteration kind (one carrying tokens) without a price;
so does one cut after it went upstream and before the upstream reported any
usage (its cost is unknown, not 0), and one whose usage this module cannot
make sense of (logged), as the meters must get every record.
"""
from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any, Mapping, Optional

from ..plugin_api import SEPARATE_ITERATIONS, TOKEN_COUNTS, UsageRecord
from ..store.catalog import Catalog, ModelEntry, PRICE_FIELDS, PriceRow

MILLION = Decimal(1_000_000)
# Ledger precision: far below a cent, so sums of rows stay exact to the cent.
_QUANTUM = Decimal("1e-10")
_ONE = Decimal(1)

log = logging.getLogger(__name__)


class Unpriced(Exception):
    """Some billed part of a request has no price; the message says which."""


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def cache_split(total: int, ephemeral_1h: Optional[int]) -> tuple[int, int]:
    """(5-minute, 1-hour) cache-write tokens from the final total and the 1 h count."""
    c1h = min(ephemeral_1h or 0, total)
    return total - c1h, c1h


def token_charge(rates: Mapping[str, Decimal], *, input_tokens: int, output_tokens: int,
                 cache_read: int, write_5m: int, write_1h: int) -> Decimal:
    """USD for these counts at these rates (USD per million tokens)."""
    return (input_tokens * rates["input"] + output_tokens * rates["output"]
            + cache_read * rates["cache_read"] + write_5m * rates["cache_write_5m"]
            + write_1h * rates["cache_write_1h"]) / MILLION


def billable(record: UsageRecord) -> bool:
    """Whether the request consumed anything upstream bills."""
    return bool(record.total_tokens or record.web_search_requests or record.iterations)


# The server tools' counts in usage.server_tool_use that have a price: searches by the request, fetches free.
_PRICED_TOOLS = frozenset(("web_search_requests", "web_fetch_requests"))

USAGE_UNKNOWN = "usage unknown: the request ended before the upstream reported any"


def price(record: UsageRecord, catalog: Catalog) -> None:
    """Set record.cost (USD, None when unpriced) and record.prices (what it was computed with).

    Never raises: usage of a shape no code expects, or arithmetic that fails on it, leaves the record
    unpriced with the reason (the try costs nothing on the normal path)."""
    detail: dict[str, Any] = {}
    try:
        # billable(), inline: every request passes here.
        if not (record.input_tokens + record.output_tokens + record.cache_read_input_tokens
                + record.cache_creation_input_tokens or record.web_search_requests or record.iterations):
            if record.usage_unknown:
                record.cost, record.prices = None, {"unpriced": USAGE_UNKNOWN}
            else:
                record.cost, record.prices = 0.0, None
            return
        entry = catalog.lookup(record.upstream_model) or catalog.lookup(record.requested_model)
        detail["model"] = entry.id if entry else (record.upstream_model or record.requested_model)
        cost = _quote(record, entry, catalog, detail)
        record.cost = float(cost.quantize(_QUANTUM))
        detail["cost"] = str(cost)
    except Unpriced as exc:
        record.cost = None
        detail["unpriced"] = str(exc)
    except Exception as exc:        # the record must still reach the meters
        record.cost = None
        detail["unpriced"] = f"usage could not be priced: {exc!r}"
        log.warning("request %s left unpriced, pricing its usage raised %r", record.request_id, exc)
    record.prices = detail


def _rates_at(entry: Optional[ModelEntry], name: Optional[str], ts: float):
    if entry is None:
        raise Unpriced(f"model {name} is not in the catalogue")
    row = _row_at(entry, ts)
    if row is None:
        raise Unpriced(f"model {entry.id} has no price")
    return row


# id(entry) -> (entry, from, until, entry.price_at(ts) for every ts in [from, until)): the row in force
# changes only where some row's effective_from lies, so it is looked up again only past one.  The entry
# is held, so its id cannot name another; a catalogue swapped whole brings new entries (bounded below).
_ROWS: dict[int, tuple[ModelEntry, float, float, Optional[PriceRow]]] = {}
# (id(row), band) -> (row, the record's fields that come from the row and its band, in their order).
_LISTED: dict[tuple[int, Optional[int]], tuple[PriceRow, dict[str, Any]]] = {}
_CACHE_MAX = 1024
_INF = float("inf")


def _row_at(entry: ModelEntry, ts: float) -> Optional[PriceRow]:
    hit = _ROWS.get(id(entry))
    if hit is not None and hit[0] is entry and hit[1] <= ts < hit[2]:
        return hit[3]
    row = entry.price_at(ts)
    starts = [r.effective_from for r in entry.price_rows]
    since = max([t for t in starts if t <= ts], default=-_INF)
    until = min([t for t in starts if t > ts], default=_INF)
    if len(_ROWS) >= _CACHE_MAX:
        _ROWS.clear()
    _ROWS[id(entry)] = (entry, since, until, row)
    return row


def _listed(row: PriceRow, band: Optional[int]) -> dict[str, Any]:
    """The prices `row` lists for `band` (floats), then where they come from."""
    key = (id(row), band)
    hit = _LISTED.get(key)
    if hit is not None and hit[0] is row:
        return hit[1]
    listed = {**row.listed[band], "effective_from": row.effective_from, "origin": row.origin, "band_above": band}
    if len(_LISTED) >= _CACHE_MAX:
        _LISTED.clear()
    _LISTED[key] = (row, listed)     # the row is held: its id cannot name another
    return listed


def _quote(record: UsageRecord, entry: Optional[ModelEntry], catalog: Catalog, detail: dict) -> Decimal:
    row = _rates_at(entry, detail["model"], record.started_at)
    assert entry is not None
    total_writes = record.cache_creation_input_tokens
    input_tokens, output_tokens, cache_read = record.input_tokens, record.output_tokens, record.cache_read_input_tokens
    rates, band = row.for_prompt(input_tokens + cache_read + total_writes) if row.bands else (row.rates, None)
    write_5m, write_1h = cache_split(total_writes, record.cache_creation_1h_input_tokens)
    # token_charge(), inline: the same expression.
    cost = (input_tokens * rates["input"] + output_tokens * rates["output"] + cache_read * rates["cache_read"]
            + write_5m * rates["cache_write_5m"] + write_1h * rates["cache_write_1h"]) / MILLION
    multipliers: dict[str, str] = {}      # only those that apply (not 1)
    if record.speed == "fast":
        if entry.fast_multiplier is None:
            raise Unpriced(f"model {entry.id} has no fast-mode multiplier")
        cost *= entry.fast_multiplier
        multipliers["speed"] = str(entry.fast_multiplier)
    if record.inference_geo in entry.geo_multipliers:
        geo = entry.geo_multipliers[record.inference_geo]
        cost *= geo
        multipliers["geo"] = str(geo)
    tier_name = record.service_tier or "standard"
    tier = catalog.rates.service_tiers.get(tier_name)
    if tier is None:
        if tier_name != "standard":     # standard is the list price, listed or not
            raise Unpriced(f"service tier {tier_name} has no multiplier")
        tier = _ONE
    if tier != _ONE:
        cost *= tier
        multipliers["tier"] = str(tier)
    detail.update(_listed(row, band))
    detail["cache_write_5m_tokens"] = write_5m
    detail["cache_write_1h_tokens"] = write_1h
    detail["multipliers"] = multipliers
    if record.server_tool_use is not None:
        for tool, count in record.server_tool_use.items():
            if count and tool not in _PRICED_TOOLS:
                raise Unpriced(f"server tool use {tool} has no price")
    if record.web_search_requests:
        per_search = catalog.rates.web_search_per_request
        if per_search is None:
            raise Unpriced("web search has no price")
        detail["web_search_per_request"] = str(per_search)
        cost += record.web_search_requests * per_search
    if record.iterations:
        cost += _iterations(record, entry, catalog, tier, detail)
    return cost


def _iterations(record: UsageRecord, entry: ModelEntry, catalog: Catalog, tier: Decimal,
                detail: dict) -> Decimal:
    total = Decimal(0)
    billed = []
    for it in record.iterations or ():
        if it.get("type") not in SEPARATE_ITERATIONS:
            if it.get("type") != "message" and any(_int(it.get(n)) for n in TOKEN_COUNTS):
                raise Unpriced(f"usage iteration of type {it.get('type')} has no price")
            continue
        name = it.get("model") if isinstance(it.get("model"), str) else None
        own = catalog.lookup(name) if name else entry
        row = _rates_at(own, name, record.started_at)
        writes = _int(it.get("cache_creation_input_tokens"))
        split = it.get("cache_creation") if isinstance(it.get("cache_creation"), dict) else {}
        write_5m, write_1h = cache_split(writes, _int(split.get("ephemeral_1h_input_tokens")))
        input_tokens, cache_read = _int(it.get("input_tokens")), _int(it.get("cache_read_input_tokens"))
        rates, _ = row.for_prompt(input_tokens + cache_read + writes)
        charge = token_charge(rates, input_tokens=input_tokens, output_tokens=_int(it.get("output_tokens")),
                              cache_read=cache_read, write_5m=write_5m, write_1h=write_1h) * tier
        geo = own.geo_multipliers.get(record.inference_geo) if own and record.inference_geo else None
        if geo is not None:
            charge *= geo
        billed.append({"type": it["type"], "model": own.id if own else name,
                       **{f: float(rates[f]) for f in PRICE_FIELDS}, **({"geo": str(geo)} if geo else {}),
                       "cost": str(charge)})
        total += charge
    if billed:
        detail["iterations"] = billed
    return total
