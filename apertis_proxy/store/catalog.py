"""The model catalogue: upstream ids, client-facing aliases, lifecycle and
effective-dated list prices.

The shipped catalogue is data (``catalog.json`` beside this module, one source
per price); ``import_catalog`` loads it, or any file of the same shape, into
the store.  Operator edits (``prices set``) are kept apart from catalogue data
(price rows of origin "operator", field names in ``models.operator_fields``),
so importing a newer catalogue never undoes them.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping, Optional

from ..plugin_api import ModelInfo

log = logging.getLogger(__name__)

PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
LIFECYCLES = ("active", "deprecated", "retired")
SHIPPED_CATALOG = Path(__file__).with_name("catalog.json")
# Model fields a catalogue file sets (besides prices) and an operator may override.
META_FIELDS = ("display_name", "created_at", "line", "lifecycle", "deprecated_at", "retires_at",
               "successor", "max_input_tokens", "max_tokens", "capabilities", "rules",
               "fast_multiplier", "geo_multipliers")
_JSON_FIELDS = frozenset({"capabilities", "rules", "geo_multipliers"})
_DATED = re.compile(r"^(?P<family>.+)-\d{8}$")   # a dated snapshot id: claude-opus-4-5-20251101

MODELS_SQL = ("SELECT id, aliases, redirect_to, operator_fields, " + ", ".join(META_FIELDS)
              + " FROM models ORDER BY created_at DESC, id")
PRICES_SQL = ("SELECT model_id, effective_from, origin, input, output, cache_write_5m,"
              " cache_write_1h, cache_read, bands, source FROM model_prices ORDER BY effective_from")
RATES_SQL = "SELECT v FROM meta WHERE k = 'billing_rates'"
# Top-level fields of a catalogue file that are not per-model prices; a file that leaves one out keeps the stored one.
BILLING_RATE_FIELDS = ("web_search_per_request", "service_tiers")
# What reading a malformed stored value raises (a missing rate, bad JSON, a band of the wrong shape).
_UNREADABLE = (ArithmeticError, AttributeError, KeyError, TypeError, ValueError)


def money(value: Any) -> Decimal:
    """A price as an exact decimal: 0.1 is one tenth, not the float nearest to it."""
    return value if isinstance(value, Decimal) else Decimal(repr(float(value)))


@dataclass(frozen=True, slots=True)
class PriceRow:
    """List prices (USD per million tokens) from `effective_from` (unix time) on."""

    effective_from: float
    origin: str                         # "catalog" or "operator"
    rates: Mapping[str, Decimal]        # keys = PRICE_FIELDS
    bands: tuple = ()                   # ((above_prompt_tokens, rates), ...) ascending
    source: str = ""
    # The same rates as floats, for the ledger row's record of them (built once, not per request).
    listed: Mapping[Any, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        listed = {None: {f: float(v) for f, v in self.rates.items()}}
        listed.update((above, {f: float(v) for f, v in rates.items()}) for above, rates in self.bands)
        object.__setattr__(self, "listed", listed)

    def for_prompt(self, prompt_tokens: int) -> tuple[Mapping[str, Decimal], Optional[int]]:
        """The rates for a request with this many prompt tokens, and the band's threshold
        (None: the base rates; `listed[threshold]` has them as floats)."""
        chosen, threshold = self.rates, None
        for above, rates in self.bands:
            if prompt_tokens > above:
                chosen, threshold = rates, above
        return chosen, threshold


@dataclass(frozen=True, slots=True)
class ModelEntry:
    id: str
    display_name: str
    created_at: str
    aliases: tuple[str, ...] = ()
    price_rows: tuple[PriceRow, ...] = ()   # ascending effective_from
    line: Optional[str] = None
    lifecycle: str = "active"
    deprecated_at: Optional[str] = None
    retires_at: Optional[str] = None        # RFC 3339
    successor: Optional[str] = None         # documented successor
    redirect_to: Optional[str] = None       # where the operator sends requests once retired
    max_input_tokens: Optional[int] = None
    max_tokens: Optional[int] = None
    capabilities: Optional[Mapping[str, Any]] = None
    # Request rules other parts of the gateway may enforce, e.g.
    # {"sampling_defaults_only": true, "thinking_enabled_refused": true}.
    rules: Mapping[str, Any] = field(default_factory=dict)
    fast_multiplier: Optional[Decimal] = None
    geo_multipliers: Mapping[str, Decimal] = field(default_factory=dict)
    operator_fields: tuple[str, ...] = ()
    retires_ts: Optional[float] = None      # retires_at as unix time (parsed once, read per request)

    def price_at(self, ts: float) -> Optional[PriceRow]:
        """The row in force at `ts`: the operator's latest if any applies, else the catalogue's."""
        operator = catalog = None
        for row in self.price_rows:         # in order of effective_from: the last one in force wins
            if row.effective_from <= ts:
                if row.origin == "operator":
                    operator = row
                elif row.origin == "catalog":
                    catalog = row
        return operator or catalog

    @property
    def prices(self) -> Optional[Mapping[str, Decimal]]:
        """The base rates in force now; None when the model has no price."""
        row = self.price_at(time.time())
        return row.rates if row else None

    def lifecycle_at(self, ts: float) -> str:
        """"retired" once `retires_at` has passed, whatever the stored state says."""
        if self.lifecycle == "retired" or (self.retires_ts is not None and self.retires_ts <= ts):
            return "retired"
        return self.lifecycle

    def info(self, as_id: Optional[str] = None) -> ModelInfo:
        return ModelInfo(id=as_id or self.id, display_name=self.display_name, created_at=self.created_at,
                         lifecycle=self.lifecycle_at(time.time()), deprecated_at=self.deprecated_at,
                         retires_at=self.retires_at, line=self.line,
                         max_input_tokens=self.max_input_tokens, max_tokens=self.max_tokens,
                         capabilities=self.capabilities)


@dataclass(frozen=True, slots=True)
class BillingRates:
    """Charges that are not per-model token prices."""

    web_search_per_request: Optional[Decimal] = None
    service_tiers: Mapping[str, Decimal] = field(default_factory=dict)   # tier -> multiplier


@dataclass(frozen=True, slots=True)
class Catalog:
    entries: tuple[ModelEntry, ...] = ()
    by_name: Mapping[str, ModelEntry] = field(default_factory=dict)   # id and every alias
    rates: BillingRates = BillingRates()

    @property
    def aliases(self) -> dict[str, str]:
        """Client-facing alias -> upstream id, for every catalogue model."""
        return {a: e.id for e in self.entries for a in e.aliases}

    def lookup(self, name: Optional[str]) -> Optional[ModelEntry]:
        """The entry named `name`; a dated snapshot id not in the table
        ("claude-opus-4-5-20991231") falls back to its family's entry, and
        nothing else does ("claude-opus-5-5" is not "claude-opus-5")."""
        if not name:
            return None
        entry = self.by_name.get(name)
        if entry is None:
            dated = _DATED.match(name)
            if dated:
                entry = self.by_name.get(dated["family"])
        return entry


def _unix(stamp: Optional[str]) -> float:
    """RFC 3339 or YYYY-MM-DD (UTC) -> unix time; None -> 0 (the beginning)."""
    if not stamp:
        return 0.0
    text = stamp.strip().replace("Z", "+00:00")
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _amount(value: Any) -> Decimal:
    """A stored rate or multiplier as a decimal; ValueError unless it is finite and >= 0."""
    amount = money(value)
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{value!r} is not a finite number >= 0")
    return amount


def _rates(source: Mapping[str, Any]) -> dict[str, Decimal]:
    return {f: _amount(source[f]) for f in PRICE_FIELDS}


def _bands(raw: Any) -> tuple:
    bands = json.loads(raw) if isinstance(raw, str) else (raw or [])
    return tuple(sorted((int(b["above_prompt_tokens"]), _rates(b)) for b in bands))


def _price_row(r) -> PriceRow:
    """A row of PRICES_SQL."""
    return PriceRow(effective_from=float(r[1]), origin=r[2],
                    rates=_rates({f: r[3 + i] for i, f in enumerate(PRICE_FIELDS)}),
                    bands=_bands(r[8]), source=r[9] or "")


def _model_entry(r, price_rows) -> ModelEntry:
    """A row of MODELS_SQL with its model's price rows."""
    meta = {name: r[4 + i] for i, name in enumerate(META_FIELDS)}
    for name in _JSON_FIELDS:
        meta[name] = json.loads(meta[name]) if meta[name] else None
    return ModelEntry(
        id=r[0], aliases=tuple(json.loads(r[1] or "[]")), redirect_to=r[2],
        operator_fields=tuple(json.loads(r[3] or "[]")),
        price_rows=tuple(sorted(price_rows, key=lambda p: p.effective_from)),
        display_name=meta["display_name"], created_at=meta["created_at"], line=meta["line"],
        lifecycle=meta["lifecycle"] or "active", deprecated_at=meta["deprecated_at"],
        retires_at=meta["retires_at"], successor=meta["successor"],
        retires_ts=_unix(meta["retires_at"]) if meta["retires_at"] else None,
        max_input_tokens=meta["max_input_tokens"], max_tokens=meta["max_tokens"],
        capabilities=meta["capabilities"], rules=meta["rules"] or {},
        fast_multiplier=_amount(meta["fast_multiplier"]) if meta["fast_multiplier"] else None,
        geo_multipliers={k: _amount(v) for k, v in (meta["geo_multipliers"] or {}).items()})


def _billing_rates(rates_row) -> BillingRates:
    """The stored billing rates; unreadable ones are left out (web searches and tiers then go unpriced)."""
    try:
        raw = json.loads(rates_row[0]) if rates_row and rates_row[0] else {}
        search = raw.get("web_search_per_request")
        return BillingRates(web_search_per_request=_amount(search) if search is not None else None,
                            service_tiers={k: _amount(v) for k, v in (raw.get("service_tiers") or {}).items()})
    except _UNREADABLE as exc:
        log.warning("catalogue: stored billing rates left out, web searches and service tiers unpriced: %r", exc)
        return BillingRates()


def catalog_from_rows(model_rows, price_rows=(), rates_row=None) -> Catalog:
    """Build the catalogue from rows of MODELS_SQL, PRICES_SQL and RATES_SQL.

    A model whose stored data cannot be read (a rate missing, negative or not finite, a malformed band or JSON
    field) is left out with a warning: it is then unpriced like any model the catalogue lacks, and the other
    models, and the configuration read with them (keys, channels), still load."""
    rows_of: dict[str, list[PriceRow]] = {}
    unreadable: dict[str, str] = {}
    for r in price_rows:
        try:
            rows_of.setdefault(r[0], []).append(_price_row(r))
        except _UNREADABLE as exc:
            unreadable.setdefault(r[0], f"its price row from {r[1]}: {exc!r}")
    entries = []
    for r in model_rows:
        problem = unreadable.get(r[0])
        if problem is None:
            try:
                entries.append(_model_entry(r, rows_of.get(r[0], ())))
                continue
            except _UNREADABLE as exc:
                problem = repr(exc)
        log.warning("catalogue: model %s left out (unpriced), its stored data cannot be read: %s", r[0], problem)
    by_name: dict[str, ModelEntry] = {e.id: e for e in entries}
    for e in entries:
        for a in e.aliases:
            by_name.setdefault(a, e)
    return Catalog(entries=tuple(entries), by_name=by_name, rates=_billing_rates(rates_row))


def load_catalog(conn) -> Catalog:
    """Build the catalogue from an open store connection (sync)."""
    return catalog_from_rows(conn.execute(MODELS_SQL).fetchall(), conn.execute(PRICES_SQL).fetchall(),
                             conn.execute(RATES_SQL).fetchone())


def find_model(conn, name: str) -> Optional[ModelEntry]:
    """The catalogue entry whose id or one of whose aliases is exactly `name`."""
    return load_catalog(conn).by_name.get(name)


# -- catalogue files -------------------------------------------------------------

def read_catalog_file(path: Path | str = SHIPPED_CATALOG) -> dict:
    """A catalogue file, checked whole: ValueError names the first problem, its model and field.

    Every number a bill is computed from (rates, band rates, multipliers, the web-search price) must be finite
    and >= 0, so what is imported prices no request below $0 and reads back from the store."""
    try:
        doc, constants = _parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:     # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"cannot read catalogue {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str) \
            or not isinstance(doc.get("models"), list):
        raise ValueError(f"{path}: expected an object with 'version' (string) and 'models' (list)")
    if doc.get("web_search_per_request") is not None:
        _check_amount(str(path), "web_search_per_request", doc["web_search_per_request"])
    _check_amounts(str(path), "service_tiers", doc.get("service_tiers"))
    for m in doc["models"]:
        _check_model(path, m)
    if constants:       # in a field the checks above leave alone
        raise ValueError(f"{path}: {constants[0]} is not a JSON number")
    return doc


def _parse_json(text: str) -> tuple[Any, list[str]]:
    """The document as Python's json reads it, and the NaN and Infinity constants it met (JSON has none):
    the checks of the fields they are in name them."""
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return float(name)

    return json.loads(text, parse_constant=constant), constants


def _is_amount(value: Any) -> bool:
    """A JSON number (a boolean is not one) that is finite and >= 0."""
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def _check_amount(where: str, name: str, value: Any) -> None:
    if not _is_amount(value):
        got = "missing" if value is None else f"got {json.dumps(value)}"
        raise ValueError(f"{where}: {name} must be a finite number >= 0 ({got})")


def _check_amounts(where: str, name: str, table: Any) -> None:
    """An optional object of amounts (multipliers by geo or by service tier)."""
    if table is None:
        return
    if not isinstance(table, dict):
        raise ValueError(f"{where}: {name} must be an object of numbers")
    for key, value in table.items():
        _check_amount(where, f"{name}.{key}", value)


def _check_model(path: Path | str, m: Any) -> None:
    where = f"{path}: model {m.get('id')!r}" if isinstance(m, dict) else f"{path}: a model"
    if not isinstance(m, dict) or not isinstance(m.get("id"), str) or not m["id"]:
        raise ValueError(f"{where}: every model needs an 'id'")
    if m.get("lifecycle", "active") not in LIFECYCLES:
        raise ValueError(f"{where}: lifecycle must be one of {', '.join(LIFECYCLES)}")
    if m.get("fast_multiplier") is not None:
        _check_amount(where, "fast_multiplier", m["fast_multiplier"])
    _check_amounts(where, "geo_multipliers", m.get("geo_multipliers"))
    prices = m.get("prices") or []
    if not isinstance(prices, list):
        raise ValueError(f"{where}: prices must be a list")
    for i, row in enumerate(prices):
        _check_price_row(where, f"prices[{i}]", row)


def _check_price_row(where: str, name: str, row: Any) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: {name} must be an object")
    _check_rates(where, name, row)
    try:
        _unix(row.get("from"))
    except (AttributeError, ValueError):
        raise ValueError(f"{where}: {name}.from must be null or a date (YYYY-MM-DD or RFC 3339)") from None
    bands = row.get("bands") or []
    if not isinstance(bands, list):
        raise ValueError(f"{where}: {name}.bands must be a list")
    thresholds = set()
    for j, band in enumerate(bands):
        band_name = f"{name}.bands[{j}]"
        if not isinstance(band, dict):
            raise ValueError(f"{where}: {band_name} must be an object")
        above = band.get("above_prompt_tokens")
        if type(above) is not int or above <= 0:
            raise ValueError(f"{where}: {band_name}.above_prompt_tokens must be a positive integer "
                             f"(got {json.dumps(above)})")
        if above in thresholds:
            raise ValueError(f"{where}: {band_name}.above_prompt_tokens repeats another band's ({above})")
        thresholds.add(above)
        _check_rates(where, band_name, band)


def _check_rates(where: str, name: str, rates: Mapping[str, Any]) -> None:
    for f in PRICE_FIELDS:
        _check_amount(where, f"{name}.{f}", rates.get(f))


def import_catalog(conn, doc: Mapping[str, Any]) -> tuple[int, int]:
    """Load a catalogue document into the store, in the caller's transaction.

    Catalogue price rows of each listed model are replaced; operator rows and
    fields the operator set stay.  Returns (models added, models updated).
    """
    added = updated = 0
    owners = {a: e.id for e in load_catalog(conn).entries for a in e.aliases}
    for m in doc["models"]:
        row = conn.execute("SELECT aliases, operator_fields FROM models WHERE id = ?", (m["id"],)).fetchone()
        meta = {f: m.get(f) for f in META_FIELDS}
        meta["display_name"] = meta["display_name"] or m["id"]
        meta["created_at"] = meta["created_at"] or "1970-01-01T00:00:00Z"
        meta["lifecycle"] = meta["lifecycle"] or "active"
        for name in _JSON_FIELDS:
            meta[name] = json.dumps(meta[name]) if meta[name] is not None else None
        # An alias the operator gave another model stays there.
        aliases = [a for a in m.get("aliases") or () if owners.get(a, m["id"]) == m["id"]]
        if row is None:
            cols = ("id", "aliases", *META_FIELDS)
            conn.execute(f"INSERT INTO models ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         (m["id"], json.dumps(aliases), *meta.values()))
            added += 1
        else:
            kept = set(json.loads(row["operator_fields"] or "[]"))
            changes = {f: v for f, v in meta.items() if f not in kept}
            if "aliases" not in kept:
                changes["aliases"] = json.dumps(aliases)
            conn.execute(f"UPDATE models SET {', '.join(f'{c} = ?' for c in changes)} WHERE id = ?",
                         (*changes.values(), m["id"]))
            updated += 1
        conn.execute("DELETE FROM model_prices WHERE model_id = ? AND origin = 'catalog'", (m["id"],))
        for p in m.get("prices") or ():
            conn.execute(
                "INSERT OR REPLACE INTO model_prices (model_id, effective_from, origin, input, output,"
                " cache_write_5m, cache_write_1h, cache_read, bands, source)"
                " VALUES (?, ?, 'catalog', ?, ?, ?, ?, ?, ?, ?)",
                (m["id"], _unix(p.get("from")), *(p[f] for f in PRICE_FIELDS),
                 json.dumps(p["bands"]) if p.get("bands") else None, p.get("source")))
    conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('billing_rates', ?)",
                 (json.dumps(_billing_rates_after(conn, doc)),))
    conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('catalog_version', ?)", (doc["version"],))
    return added, updated


def _billing_rates_after(conn, doc: Mapping[str, Any]) -> dict:
    """The stored billing rates with those `doc` lists in their place: a file of new models keeps the rest."""
    row = conn.execute(RATES_SQL).fetchone()
    try:
        stored = json.loads(row[0]) if row and row[0] else {}
    except ValueError:      # unreadable: what the file lists replaces it
        stored = {}
    rates = stored if isinstance(stored, dict) else {}
    rates.update((name, doc[name]) for name in BILLING_RATE_FIELDS if name in doc)
    return rates


def catalog_version(conn) -> Optional[str]:
    row = conn.execute("SELECT v FROM meta WHERE k = 'catalog_version'").fetchone()
    return row[0] if row else None


def sync_shipped_catalog(conn) -> None:
    """Import the shipped catalogue when it is newer than the one in the store."""
    doc = read_catalog_file(SHIPPED_CATALOG)
    if (catalog_version(conn) or "") >= doc["version"]:
        return
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        if (catalog_version(conn) or "") < doc["version"]:   # another process may have done it
            import_catalog(conn, doc)


# -- operator edits ----------------------------------------------------------------

def _mark(conn, model_id: str, fields) -> None:
    row = conn.execute("SELECT operator_fields FROM models WHERE id = ?", (model_id,)).fetchone()
    kept = list(dict.fromkeys([*json.loads(row[0] or "[]"), *fields]))
    conn.execute("UPDATE models SET operator_fields = ? WHERE id = ?", (json.dumps(kept), model_id))


def set_model(conn, name: str, *, prices: Optional[Mapping[str, float]] = None,
              add_aliases=(), remove_aliases=(), display_name: Optional[str] = None,
              effective_from: Optional[float] = None, successor: Optional[str] = None,
              ) -> tuple[ModelEntry, bool]:
    """Update the model whose id or alias is `name`, or create it.

    Returns (entry, created).  Prices apply from `effective_from` (unix time,
    default now) on and never reprice earlier requests; fields left out keep
    the price in force then, and its prompt-size bands stay, each band's
    rate for a changed field scaled by the same factor as the base rate
    (`_scaled_bands`); a model without a price needs `input` and
    `output` (cache prices then follow the usual ratios to the input price:
    write 5m x1.25, write 1h x2, read x0.1).  `successor` is where requests
    for the model go once it is retired.  An alias naming another model
    raises ValueError, unless that model is retired (the alias moves).
    """
    prices = {k: money(v) for k, v in (prices or {}).items() if v is not None}
    unknown = set(prices) - set(PRICE_FIELDS)
    if unknown:
        raise TypeError(f"unknown price field(s): {', '.join(sorted(unknown))}")
    if any(v < 0 for v in prices.values()):
        raise ValueError("prices cannot be negative")
    when = time.time() if effective_from is None else effective_from
    conn.execute("BEGIN IMMEDIATE")
    with conn:   # commits, or rolls back on an exception
        catalog = load_catalog(conn)
        entry = catalog.by_name.get(name)
        created = entry is None
        model_id = name if created else entry.id
        for alias in add_aliases:
            owner = catalog.by_name.get(alias)
            if owner is not None and owner.id != model_id:
                if owner.lifecycle_at(time.time()) != "retired":
                    raise ValueError(f"{alias!r} already names model {owner.id!r}")
                conn.execute("UPDATE models SET aliases = ? WHERE id = ?",
                             (json.dumps([a for a in owner.aliases if a != alias]), owner.id))
                _mark(conn, owner.id, ["aliases"])
        if successor is not None:
            target = catalog.by_name.get(successor)
            if target is None or target.id == model_id:
                raise ValueError(f"successor {successor!r} is not another model in the catalogue")
            successor = target.id
        current = None if created else entry.price_at(when)
        if prices or created:
            base = dict(current.rates) if current else {}
            if not base:
                missing = [f for f in ("input", "output") if f not in prices]
                if missing:
                    raise ValueError(f"{name!r} has no price yet; it needs "
                                     + " and ".join(f"--{f}" for f in missing))
                base = {"cache_write_5m": prices["input"] * Decimal("1.25"),
                        "cache_write_1h": prices["input"] * 2, "cache_read": prices["input"] / 10}
            full = {**base, **prices}
            bands = _scaled_bands(current, full) if current else None
        if created:
            aliases = [a for a in dict.fromkeys(add_aliases) if a not in remove_aliases and a != model_id]
            conn.execute(
                "INSERT INTO models (id, display_name, created_at, aliases, operator_fields)"
                " VALUES (?, ?, ?, ?, ?)",
                (model_id, display_name or model_id, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 json.dumps(aliases), json.dumps(["display_name", "aliases"])))
        else:
            aliases = [a for a in entry.aliases if a not in remove_aliases]
            aliases += [a for a in add_aliases if a not in aliases and a != model_id]
            changes: dict[str, object] = {}
            if list(aliases) != list(entry.aliases):
                changes["aliases"] = json.dumps(aliases)
            if display_name:
                changes["display_name"] = display_name
            if changes:
                conn.execute(f"UPDATE models SET {', '.join(f'{c} = ?' for c in changes)} WHERE id = ?",
                             (*changes.values(), model_id))
                _mark(conn, model_id, changes)
        if successor is not None:
            conn.execute("UPDATE models SET redirect_to = ? WHERE id = ?", (successor, model_id))
        if prices or created:
            conn.execute(
                "INSERT OR REPLACE INTO model_prices (model_id, effective_from, origin, input, output,"
                " cache_write_5m, cache_write_1h, cache_read, bands, source)"
                " VALUES (?, ?, 'operator', ?, ?, ?, ?, ?, ?, 'prices set')",
                (model_id, when, *(str(full[f]) for f in PRICE_FIELDS), bands))
        return load_catalog(conn).by_name[model_id], created


# Band rates derived from an operator's change keep this many decimals (USD per million tokens).
_BAND_QUANTUM = Decimal("1e-6")


def _scaled_bands(current: PriceRow, rates: Mapping[str, Decimal]) -> Optional[str]:
    """The prompt-size bands of `current` for new base `rates` (JSON, None without bands):
    a band's rate moves by the same factor as the base rate of its field."""
    if not current.bands:
        return None
    out = []
    for above, band in current.bands:
        scaled = {}
        for f in PRICE_FIELDS:
            old, new = current.rates[f], rates[f]
            scaled[f] = band[f] if old == new or not old else (band[f] * new / old).quantize(_BAND_QUANTUM)
        out.append({"above_prompt_tokens": above, **{f: str(v) for f, v in scaled.items()}})
    return json.dumps(out)


def remove_model(conn, name: str) -> str:
    """Delete the model whose id or alias is `name` and its prices; returns its id."""
    entry = find_model(conn, name)
    if entry is None:
        raise LookupError(f"no model {name!r} in the catalogue")
    conn.execute("DELETE FROM model_prices WHERE model_id = ?", (entry.id,))
    conn.execute("DELETE FROM models WHERE id = ?", (entry.id,))
    return entry.id
