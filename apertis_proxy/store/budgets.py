"""Budget state: spend per quota period, budget alerts fired, requests refused.

Functions of a store connection (sqlite3 or PgConnection): the server runs them
on the store's thread (``store.call``), the CLI on its own connection.  Periods
and their first days come from apertis_proxy.budgets.periods.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping, Optional

from .url import dialect

UNKNOWN_KEY = "(unknown)"   # refusals of a missing or unknown key are counted under this name


# -- the server's (keys plugin, through store.call) ----------------------------

def add_period_spend(conn, rows: Iterable[tuple[int, str, str, float, int]]) -> None:
    """Add (key_id, period, start, cost, tokens) to each key's spend in that period.
    Runs inside the caller's transaction; a key deleted meanwhile is skipped."""
    for key_id, period, start, cost, tokens in rows:
        if conn.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone() is None:
            continue
        conn.execute(
            "INSERT INTO key_period_spend (key_id, period, start, cost, tokens) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (key_id, period, start) DO UPDATE SET cost = key_period_spend.cost + excluded.cost,"
            " tokens = key_period_spend.tokens + excluded.tokens", (key_id, period, start, cost, tokens))


def read_period_spend(conn, starts: Mapping[str, str]) -> dict[tuple[int, str], tuple[float, int]]:
    """(key_id, period) -> (cost, tokens) in the period starting at starts[period]."""
    out: dict[tuple[int, str], tuple[float, int]] = {}
    for period, start in starts.items():
        for row in conn.execute("SELECT key_id, cost, tokens FROM key_period_spend"
                                " WHERE period = ? AND start = ?", (period, start)).fetchall():
            out[(row[0], period)] = (row[1], row[2])
    return out


def claim_alert(conn, key_id: int, period: str, start: str, threshold: int, key_name: str,
                now: float) -> bool:
    """Record that this alert fires; True for the one caller (of any process or host) that recorded it."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO budget_alerts (key_id, period, start, threshold, key_name, claimed_at)"
        " VALUES (?,?,?,?,?,?)", (key_id, period, start, threshold, key_name, now))
    return cur.rowcount == 1


def record_alert_attempt(conn, key_id: int, period: str, start: str, threshold: int, *,
                         sent_at: Optional[float], error: Optional[str]) -> None:
    conn.execute(
        "UPDATE budget_alerts SET attempts = attempts + 1, sent_at = ?, last_error = ?"
        " WHERE key_id = ? AND period = ? AND start = ? AND threshold = ?",
        (sent_at, error, key_id, period, start, threshold))


def add_refusals(conn, counts: Mapping[tuple[str, str, str, int], int]) -> None:
    """Add {(day, key name, reason, status): n} to the refusal counters."""
    conn.executemany(
        "INSERT INTO refusals (day, key_name, reason, status, count) VALUES (?,?,?,?,?)"
        " ON CONFLICT (day, key_name, reason) DO UPDATE SET count = refusals.count + excluded.count",
        [(*k, n) for k, n in counts.items()])


def prune_refusals(conn, cutoff: float) -> None:
    """Drop the refusal counts of days wholly before `cutoff` (unix time)."""
    conn.execute("DELETE FROM refusals WHERE day < ?", (_utc_day(cutoff),))


# -- the CLI's ----------------------------------------------------------------

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
    ledger_day = ("to_char(to_timestamp(floor(ts)) AT TIME ZONE 'UTC', 'YYYY-MM-DD')" if dialect(conn) == "postgresql"
                  else "strftime('%Y-%m-%d', CAST(ts AS INTEGER), 'unixepoch')")     # as usage.GROUPINGS
    return [dict(r) for r in conn.execute(
        f"SELECT key_name, reason, status, source, SUM(count) AS count, MIN(day) AS first_day,"
        f" MAX(day) AS last_day FROM ("
        f"  SELECT key_name, reason, status, 'auth' AS source, count, day FROM refusals {day_where}"
        f"  UNION ALL"
        f"  SELECT COALESCE(key_name, '{UNKNOWN_KEY}'), COALESCE(error_type, 'error'), status, 'ledger', 1,"
        f"         {ledger_day} FROM usage {ledger_where}) AS refused"
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
