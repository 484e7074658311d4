"""Settled spend per key (`key_spend`): added to by settlement, read by quota checks."""
from __future__ import annotations

from typing import Iterable


def settle_spend(conn, deltas: Iterable[tuple[int, float, int]]) -> dict[int, tuple[float, int]]:
    """Add (key id, cost, tokens) amounts in one transaction and return every key's spend.

    A key deleted meanwhile is skipped, not a foreign-key error that would block
    every other key's spend."""
    deltas = list(deltas)
    if not deltas:
        return read_spend(conn)
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        for key_id, cost, tokens in deltas:
            if conn.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone() is None:
                continue
            conn.execute("INSERT INTO key_spend (key_id, cost, tokens) VALUES (?, ?, ?)"
                         " ON CONFLICT (key_id) DO UPDATE SET cost = key_spend.cost + excluded.cost,"
                         " tokens = key_spend.tokens + excluded.tokens", (key_id, cost, tokens))
        return read_spend(conn)


def read_spend(conn) -> dict[int, tuple[float, int]]:
    return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT key_id, cost, tokens FROM key_spend")}
