"""The model catalogue: upstream ids, client-facing aliases and list prices."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..plugin_api import ModelInfo

PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    id: str
    display_name: str
    created_at: str
    aliases: tuple[str, ...]
    prices: Mapping[str, float]          # USD per million tokens, keys = PRICE_FIELDS

    def info(self, as_id: Optional[str] = None) -> ModelInfo:
        return ModelInfo(id=as_id or self.id, display_name=self.display_name, created_at=self.created_at)


@dataclass(frozen=True, slots=True)
class Catalog:
    entries: tuple[ModelEntry, ...] = ()
    by_name: Mapping[str, ModelEntry] = field(default_factory=dict)   # id and every alias

    @property
    def aliases(self) -> dict[str, str]:
        """Client-facing alias -> upstream id, for every catalogue model."""
        return {a: e.id for e in self.entries for a in e.aliases}

    def lookup(self, name: Optional[str]) -> Optional[ModelEntry]:
        if not name:
            return None
        entry = self.by_name.get(name)
        if entry is None:
            # Dated ids not (yet) in the table still price as their family
            # ("claude-sonnet-4-5-20991231" -> "claude-sonnet-4-5").
            for known, e in self.by_name.items():
                if name.startswith(known + "-"):
                    return e
        return entry


def load_catalog(conn) -> Catalog:
    """Build the catalogue from an open sqlite3 connection (sync)."""
    rows = conn.execute(
        "SELECT id, display_name, created_at, aliases, input, output, cache_write_5m,"
        " cache_write_1h, cache_read FROM models ORDER BY created_at DESC, id").fetchall()
    return catalog_from_rows(rows)


def catalog_from_rows(rows) -> Catalog:
    entries = []
    by_name: dict[str, ModelEntry] = {}
    for r in rows:
        entry = ModelEntry(
            id=r[0], display_name=r[1], created_at=r[2], aliases=tuple(json.loads(r[3] or "[]")),
            prices={f: float(r[4 + i]) for i, f in enumerate(PRICE_FIELDS)})
        entries.append(entry)
    for e in entries:
        by_name[e.id] = e
    for e in entries:
        for a in e.aliases:
            by_name.setdefault(a, e)
    return Catalog(entries=tuple(entries), by_name=by_name)


def find_model(conn, name: str) -> Optional[ModelEntry]:
    """The catalogue entry whose id or one of whose aliases is exactly `name`."""
    return load_catalog(conn).by_name.get(name)


def set_model(conn, name: str, *, prices: Optional[Mapping[str, float]] = None,
              add_aliases=(), remove_aliases=(), display_name: Optional[str] = None
              ) -> tuple[ModelEntry, bool]:
    """Update the model whose id or alias is `name`, or create it.

    Returns (entry, created).  A new model needs `input` and `output` prices;
    cache prices left out follow Anthropic's usual ratios to the input price
    (write 5m x1.25, write 1h x2, read x0.1).  An alias already naming another
    model raises ValueError.
    """
    prices = {k: float(v) for k, v in (prices or {}).items() if v is not None}
    unknown = set(prices) - set(PRICE_FIELDS)
    if unknown:
        raise TypeError(f"unknown price field(s): {', '.join(sorted(unknown))}")
    if any(v < 0 for v in prices.values()):
        raise ValueError("prices cannot be negative")
    conn.execute("BEGIN IMMEDIATE")
    with conn:   # commits, or rolls back on an exception
        catalog = load_catalog(conn)
        entry = catalog.by_name.get(name)
        created = entry is None
        model_id = name if created else entry.id
        for alias in add_aliases:
            owner = catalog.by_name.get(alias)
            if owner is not None and owner.id != model_id:
                raise ValueError(f"{alias!r} already names model {owner.id!r}")
        if created:
            missing = [f for f in ("input", "output") if f not in prices]
            if missing:
                raise ValueError(f"{name!r} is not in the catalogue; a new model needs "
                                 + " and ".join(f"--{f}" for f in missing))
            base = prices["input"]
            full = {"cache_write_5m": base * 1.25, "cache_write_1h": base * 2.0,
                    "cache_read": base * 0.1, **prices}
            aliases = [a for a in dict.fromkeys(add_aliases) if a not in remove_aliases and a != model_id]
            conn.execute(
                "INSERT INTO models (id, display_name, created_at, aliases, input, output,"
                " cache_write_5m, cache_write_1h, cache_read) VALUES (?,?,?,?,?,?,?,?,?)",
                (model_id, display_name or model_id,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), json.dumps(aliases),
                 *(full[f] for f in PRICE_FIELDS)))
        else:
            aliases = [a for a in entry.aliases if a not in remove_aliases]
            aliases += [a for a in add_aliases if a not in aliases and a != model_id]
            changes: dict[str, object] = dict(prices)
            changes["aliases"] = json.dumps(aliases)
            if display_name:
                changes["display_name"] = display_name
            cols = ", ".join(f"{c} = ?" for c in changes)
            conn.execute(f"UPDATE models SET {cols} WHERE id = ?", (*changes.values(), model_id))
        return load_catalog(conn).by_name[model_id], created


def remove_model(conn, name: str) -> str:
    """Delete the model whose id or alias is `name`; returns its id."""
    entry = find_model(conn, name)
    if entry is None:
        raise LookupError(f"no model {name!r} in the catalogue")
    conn.execute("DELETE FROM models WHERE id = ?", (entry.id,))
    return entry.id
