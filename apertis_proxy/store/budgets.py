"""Budget state: spend per quota period, budget alerts fired, requests refused.

The async functions take the server's aiosqlite connection (the keys plugin
calls them from its background tick), the plain ones the CLI's sqlite3
connection.  Periods and their first days come from apertis_proxy.budgets.periods.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping, Optional

import aiosqlite

UNKNOWN_KEY = "(unknown)"   # refusals of a missing or unknown key are counted under this name


# -- server side (aiosqlite) --------------------------------------------------

async def add_period_spend(conn: aiosqlite.Connection,
                           rows: Iterable[tuple[int, str, str, float, int]]) -> None:
    """Add (key_id, period, start, cost, tokens) to each key's spend in that period.
    Runs inside the caller's transaction; a key deleted meanwhile is skipped."""
    await conn.executemany(
        "INSERT INTO key_period_spend (key_id, period, start, cost, tokens)"
        " SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM keys WHERE id = ?1)"
        " ON CONFLICT (key_id, period, start) DO UPDATE SET cost = cost + excluded.cost,"
        " tokens = tokens + excluded.tokens", list(rows))


async def read_period_spend(conn: aiosqlite.Connection,
                            starts: Mapping[str, str]) -> dict[tuple[int, str], tuple[float, int]]:
    """(key_id, period) -> (cost, tokens) in the period starting at starts[period]."""
    out: dict[tuple[int, str], tuple[float, int]] = {}
    for period, start in starts.items():
        async with conn.execute("SELECT key_id, cost, tokens FROM key_period_spend"
                                " WHERE period = ? AND start = ?", (period, start)) as cur:
            for row in await cur.fetchall():
                out[(row[0], period)] = (row[1], row[2])
    return out


async def claim_alert(conn: aiosqlite.Connection, key_id: int, period: str, start: str,
                      threshold: int, key_name: str, now: float) -> bool:
    """Record that this alert fires; True for the one caller (of any process) that recorded it."""
    async with conn.execute(
            "INSERT OR IGNORE INTO budget_alerts (key_id, period, start, threshold, key_name, claimed_at)"
            " VALUES (?,?,?,?,?,?)", (key_id, period, start, threshold, key_name, now)) as cur:
        return cur.rowcount == 1


async def record_alert_attempt(conn: aiosqlite.Connection, key_id: int, period: str, start: str,
                               threshold: int, *, sent_at: Optional[float], error: Optional[str]) -> None:
    await conn.execute(
        "UPDATE budget_alerts SET attempts = attempts + 1, sent_at = ?, last_error = ?"
        " WHERE key_id = ? AND period = ? AND start = ? AND threshold = ?",
        (sent_at, error, key_id, period, start, threshold))


async def add_refusals(conn: aiosqlite.Connection,
                       counts: Mapping[tuple[str, str, str, int], int]) -> None:
    """Add {(day, key name, reason, status): n} to the refusal counters."""
    await conn.executemany(
        "INSERT INTO refusals (day, key_name, reason, status, count) VALUES (?,?,?,?,?)"
        " ON CONFLICT (day, key_name, reason) DO UPDATE SET count = count + excluded.count",
        [(*k, n) for k, n in counts.items()])


# -- CLI side (sqlite3) -------------------------------------------------------

def period_spend(conn, key_id: int, period: str, start: str) -> tuple[float, int]:
    """A key's (cost, tokens) in the period starting on `start`."""
    row = conn.execute("SELECT cost, tokens FROM key_period_spend WHERE key_id = ? AND period = ?"
                       " AND start = ?", (key_id, period, start)).fetchone()
    return (row[0], row[1]) if row else (0.0, 0)


def period_history(conn, key_id: int, period: str) -> list[dict[str, Any]]:
    """Every recorded period of a key, newest first: start, cost, tokens."""
    return [dict(r) for r in conn.execute(
        "SELECT start, cost, tokens FROM key_period_spend WHERE key_id = ? AND period = ?"
        " ORDER BY start DESC", (key_id, period))]


def alerts(conn, key_id: int) -> list[dict[str, Any]]:
    """The budget alerts fired for a key, newest first."""
    return [dict(r) for r in conn.execute(
        "SELECT period, start, threshold, claimed_at, attempts, sent_at, last_error FROM budget_alerts"
        " WHERE key_id = ? ORDER BY claimed_at DESC, threshold DESC", (key_id,))]


REFUSED_STATUSES = (401, 402, 403, 429)


def refusal_counts(conn, *, key: Optional[str] = None, since: Optional[float] = None,
                   until: Optional[float] = None) -> list[dict[str, Any]]:
    """Requests the gateway refused itself, per key and reason, most refused first.

    Two sources: refusals by the auth plugin (table `refusals`, source "auth",
    counted per UTC day, so since/until round out to whole days), and refusals
    after the key was accepted, which are ledger rows that never reached a
    channel (source "ledger", reason = their error type).
    """
    day_where, day_params = _where((key, "key_name = ?"), (_utc_day(since), "day >= ?"),
                                   (_utc_day(until, end=True), "day < ?"))
    ledger_where, ledger_params = _where((key, "key_name = ?"), (since, "ts >= ?"), (until, "ts < ?"))
    statuses = ", ".join(map(str, REFUSED_STATUSES))
    ledger_where = (ledger_where + " AND " if ledger_where else "WHERE ") + \
        f"status IN ({statuses}) AND attempts = 0"
    return [dict(r) for r in conn.execute(
        f"SELECT key_name, reason, status, source, SUM(count) AS count, MIN(day) AS first_day,"
        f" MAX(day) AS last_day FROM ("
        f"  SELECT key_name, reason, status, 'auth' AS source, count, day FROM refusals {day_where}"
        f"  UNION ALL"
        f"  SELECT COALESCE(key_name, '{UNKNOWN_KEY}'), COALESCE(error_type, 'error'), status, 'ledger', 1,"
        f"         strftime('%Y-%m-%d', ts, 'unixepoch') FROM usage {ledger_where})"
        f" GROUP BY key_name, reason, status, source ORDER BY count DESC, key_name, reason",
        [*day_params, *ledger_params])]


def _where(*pairs: tuple[Any, str]) -> tuple[str, list[Any]]:
    clauses = [(clause, value) for value, clause in pairs if value is not None]
    if not clauses:
        return "", []
    return "WHERE " + " AND ".join(c for c, _ in clauses), [v for _, v in clauses]


def _utc_day(ts: Optional[float], *, end: bool = False) -> Optional[str]:
    """The UTC day of a time; as an exclusive end, a time inside a day includes that day."""
    if ts is None:
        return None
    day = datetime.fromtimestamp(ts, timezone.utc)
    if end and (day.hour or day.minute or day.second or day.microsecond):
        day += timedelta(days=1)
    return day.strftime("%Y-%m-%d")
