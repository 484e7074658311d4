"""Settled spend per key (`key_spend`): added to by settlement, read by quota checks."""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

from .budgets import add_period_spend, read_period_spend

Spend = dict[int, tuple[float, int]]
PeriodSpend = dict[tuple[int, str], tuple[float, int]]


def settle_spend(conn, deltas: Iterable[tuple[int, float, int]],
                 period_deltas: Iterable[tuple[int, str, str, float, int]] = (),
                 starts: Optional[Mapping[str, str]] = None) -> tuple[Spend, PeriodSpend]:
    """Add (key id, cost, tokens) amounts, and (key id, period, start, cost, tokens) to the quota periods'
    spend, in one transaction; every key's spend, and the spend in the periods starting at `starts`.

    A key deleted meanwhile is skipped, not a foreign-key error that would block
    every other key's spend."""
    deltas = list(deltas)
    if not deltas:
        return read_spend(conn), read_period_spend(conn, starts or {})
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        add_period_spend(conn, period_deltas)
        for key_id, cost, tokens in deltas:
            add_key_spend(conn, key_id, cost, tokens)
        return read_spend(conn), read_period_spend(conn, starts or {})


def add_key_spend(conn, key_id: int, cost: float, tokens: int) -> bool:
    """Add to one key's settled spend (inside the caller's transaction); False for a key deleted meanwhile."""
    if conn.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone() is None:
        return False
    conn.execute("INSERT INTO key_spend (key_id, cost, tokens) VALUES (?, ?, ?)"
                 " ON CONFLICT (key_id) DO UPDATE SET cost = key_spend.cost + excluded.cost,"
                 " tokens = key_spend.tokens + excluded.tokens", (key_id, cost, tokens))
    return True


def read_spend(conn) -> dict[int, tuple[float, int]]:
    return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT key_id, cost, tokens FROM key_spend")}
