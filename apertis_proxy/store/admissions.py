"""Admissions: a key's quota, concurrency and requests per minute, decided in the store.

Every gateway process (worker or host) admits a limited key's request with one
transaction against the shared store, so the limits hold across all of them:

* ``admissions``: one row per admitted request not yet in the ledger.  While the
  request runs (``live = 1``) the row holds a concurrency slot and reserves an
  upper bound of the request's cost; once it ended (``live = 0``) the row holds
  its exact cost until the ledger row is written, which deletes it in the same
  transaction that adds the cost to ``key_spend`` (ledger_write.py, pg_ledger.py).
* ``admission_times``: when each admission happened, for the sliding minute.
* ``limit_leases``: one row per gateway process, renewed every third of its
  length.  A row of ``admissions`` counts only while its holder's lease runs, so
  a process killed with its slots and reservations frees them when its lease
  runs out, with no one cleaning up.

Time is the store's: SQLite serves one host, whose clock the store thread reads;
PostgreSQL's ``clock_timestamp()`` is one clock for every host.  Admissions of a
key are serialised by ``BEGIN IMMEDIATE`` (SQLite) or a transaction-scoped
advisory lock on the key (PostgreSQL); the spend, the ledger's deletions and the
admissions are read by one statement, one snapshot.

Refusals, in the order a client sees them: 402 the quota is used up (settled
spend plus ended requests' exact costs), 429 concurrency, 429 requests per
minute, 429 the request's bound does not fit beside the bounds in flight.  A
bound that does not fit while nothing else of the key is in flight is admitted:
the request runs alone, so a quota is overshot by at most one request's cost.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from ..budgets.periods import period_start
from .url import dialect

RPM_WINDOW = 60.0            # seconds
BUSY_RETRY_AFTER = 1         # seconds: a slot or some quota headroom usually frees up quickly
# Advisory lock namespace (the first int4 of pg_advisory_xact_lock(int4, int4)) for admissions.
PG_ADMISSION_LOCK = 0x61647331
# A lease that ran out this long ago, and its admissions, are deleted (a lapsed
# lease's admissions stop counting at once; the rows only wait for garbage collection).
STALE_LEASE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Limits:
    """One key's limits as configured (None: no such limit)."""

    key_id: int
    quota_cost: Optional[float] = None
    quota_tokens: Optional[int] = None
    quota_period: Optional[str] = None     # day, week, month (UTC); None = lifetime
    rpm: Optional[int] = None
    concurrency: Optional[int] = None


@dataclass(frozen=True, slots=True)
class Use:
    """What the store holds for one key at the moment of a decision."""

    spent_cost: float          # settled (ledger) plus ended requests' exact costs
    spent_tokens: int
    live: int                  # requests in flight (concurrency slots)
    live_cost: float           # their reserved bounds
    live_tokens: int
    recent: int                # admissions in the last minute
    oldest: Optional[float]    # the oldest of those (store clock)


@dataclass(frozen=True, slots=True)
class Decision:
    """None of `reason` means admitted; else the refusal and what the client is told."""

    reason: Optional[str] = None       # quota, concurrency, rpm, quota_reserved
    retry_after: Optional[int] = None
    use: Optional[Use] = None
    holders: int = 1                   # live leases (gateway processes) when decided

    @property
    def admitted(self) -> bool:
        return self.reason is None


def decide(limits: Limits, use: Use, now: float, bound_cost: float, bound_tokens: int) -> Decision:
    """The decision for one request of `limits` given `use` (pure: the store calls it inside the
    transaction that records the admission)."""
    if limits.quota_cost is not None and use.spent_cost >= limits.quota_cost:
        return Decision("quota", None, use)
    if limits.quota_tokens is not None and use.spent_tokens >= limits.quota_tokens:
        return Decision("quota", None, use)
    if limits.concurrency is not None and use.live >= limits.concurrency:
        return Decision("concurrency", BUSY_RETRY_AFTER, use)
    if limits.rpm is not None and use.recent >= limits.rpm:
        oldest = use.oldest if use.oldest is not None else now
        return Decision("rpm", max(1, math.ceil(oldest + RPM_WINDOW - now)), use)
    if use.live:
        if (limits.quota_cost is not None
                and use.spent_cost + use.live_cost + bound_cost > limits.quota_cost):
            return Decision("quota_reserved", BUSY_RETRY_AFTER, use)
        if (limits.quota_tokens is not None
                and use.spent_tokens + use.live_tokens + bound_tokens > limits.quota_tokens):
            return Decision("quota_reserved", BUSY_RETRY_AFTER, use)
    return Decision(None, None, use)


# -- statements ------------------------------------------------------------------------

_SPEND_LIFETIME = "SELECT cost, tokens FROM key_spend WHERE key_id = ?1"
_SPEND_PERIOD = "SELECT cost, tokens FROM key_period_spend WHERE key_id = ?1 AND period = ?4 AND start = ?5"

# ?1 key id, ?2 now, ?3 start of the minute window, (?4 period, ?5 its start).
_USE = """
SELECT COALESCE(s.cost, 0), COALESCE(s.tokens, 0), a.live, a.live_cost, a.live_tokens, a.ended_cost,
       a.ended_tokens, r.n, r.oldest, h.n
FROM (SELECT 1) one
LEFT JOIN ({spend}) s ON 1 = 1
CROSS JOIN (SELECT COALESCE(SUM(a.live), 0) AS live,
                   COALESCE(SUM(CASE WHEN a.live = 1 THEN a.cost ELSE 0 END), 0) AS live_cost,
                   COALESCE(SUM(CASE WHEN a.live = 1 THEN a.tokens ELSE 0 END), 0) AS live_tokens,
                   COALESCE(SUM(CASE WHEN a.live = 0 THEN a.cost ELSE 0 END), 0) AS ended_cost,
                   COALESCE(SUM(CASE WHEN a.live = 0 THEN a.tokens ELSE 0 END), 0) AS ended_tokens
            FROM admissions a JOIN limit_leases l ON l.holder = a.holder
            WHERE a.key_id = ?1 AND l.expires_at > ?2) a
CROSS JOIN (SELECT COUNT(*) AS n, MIN(at) AS oldest FROM admission_times WHERE key_id = ?1 AND at > ?3) r
CROSS JOIN (SELECT COUNT(*) AS n FROM limit_leases WHERE expires_at > ?2) h
"""

_ADMIT = ("INSERT INTO admissions (request_id, key_id, holder, admitted_at, live, cost, tokens)"
          " VALUES (?, ?, ?, ?, 1, ?, ?)")
_ADMIT_TIME = "INSERT INTO admission_times (key_id, at) VALUES (?, ?)"
_FORGET_TIMES = "DELETE FROM admission_times WHERE key_id = ? AND at <= ?"


def _now(conn, pg: bool) -> float:
    if pg:
        return float(conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0])
    return time.time()


def admit(conn, limits: Limits, request_id: str, holder: str, bound_cost: float, bound_tokens: int) -> Decision:
    """Decide on one request of `limits` and, when admitted, record it; one transaction."""
    pg = dialect(conn) == "postgresql"
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        if pg:
            conn.execute("SELECT pg_advisory_xact_lock(?, ?)", (PG_ADMISSION_LOCK, limits.key_id))
        now = _now(conn, pg)
        params: tuple = (limits.key_id, now, now - RPM_WINDOW)
        spend = _SPEND_LIFETIME
        if limits.quota_period is not None:
            spend = _SPEND_PERIOD
            params += (limits.quota_period, period_start(limits.quota_period, now))
        row = conn.execute(_USE.format(spend=spend), params).fetchone()
        use = Use(spent_cost=float(row[0]) + float(row[5]), spent_tokens=int(row[1]) + int(row[6]),
                  live=int(row[2]), live_cost=float(row[3]), live_tokens=int(row[4]),
                  recent=int(row[7]), oldest=None if row[8] is None else float(row[8]))
        decision = decide(limits, use, now, bound_cost, bound_tokens)
        holders = max(1, int(row[9]))
        if decision.admitted:
            conn.execute(_ADMIT, (request_id, limits.key_id, holder, now, bound_cost, bound_tokens))
            if limits.rpm is not None:
                conn.execute(_ADMIT_TIME, (limits.key_id, now))
                if use.oldest is not None and use.recent >= limits.rpm // 2:
                    conn.execute(_FORGET_TIMES, (limits.key_id, now - RPM_WINDOW))
        return Decision(decision.reason, decision.retry_after, use, holders)


def release(conn, request_id: str, cost: float, tokens: int, settled_by_ledger: bool,
            key_id: Optional[int] = None, period: Optional[str] = None, start: Optional[str] = None) -> None:
    """A request ended: its slot is free.  With the ledger settling spend, its reservation becomes its
    exact cost until the ledger row deletes it (a request that cost nothing is forgotten at once);
    else its cost is added to the key's spend here, in the same transaction as the deletion."""
    if settled_by_ledger:
        if cost or tokens:
            conn.execute("UPDATE admissions SET live = 0, cost = ?, tokens = ? WHERE request_id = ?",
                         (cost, tokens, request_id))
        else:
            conn.execute("DELETE FROM admissions WHERE request_id = ?", (request_id,))
        return
    from .budgets import add_period_spend
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        found = conn.execute("DELETE FROM admissions WHERE request_id = ?", (request_id,)).rowcount
        if not found or key_id is None or not (cost or tokens):
            return
        if conn.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone() is None:
            return
        conn.execute("INSERT INTO key_spend (key_id, cost, tokens) VALUES (?, ?, ?)"
                     " ON CONFLICT (key_id) DO UPDATE SET cost = key_spend.cost + excluded.cost,"
                     " tokens = key_spend.tokens + excluded.tokens", (key_id, cost, tokens))
        if period is not None and start is not None:
            add_period_spend(conn, [(key_id, period, start, cost, tokens)])


_RENEW = ("INSERT INTO limit_leases (holder, expires_at) VALUES (?, ?)"
          " ON CONFLICT (holder) DO UPDATE SET expires_at = excluded.expires_at")


def renew_lease(conn, holder: str, seconds: float) -> int:
    """Extend `holder`'s lease to now + `seconds`, drop leases long run out with their admissions
    and the minute window's old entries; the number of live leases."""
    pg = dialect(conn) == "postgresql"
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        now = _now(conn, pg)
        conn.execute(_RENEW, (holder, now + seconds))
        stale = now - STALE_LEASE_SECONDS
        conn.execute("DELETE FROM admissions WHERE holder IN"
                     " (SELECT holder FROM limit_leases WHERE expires_at < ?)", (stale,))
        conn.execute("DELETE FROM limit_leases WHERE expires_at < ?", (stale,))
        conn.execute("DELETE FROM admission_times WHERE at <= ?", (now - RPM_WINDOW,))
        return int(conn.execute("SELECT COUNT(*) FROM limit_leases WHERE expires_at > ?",
                                (now,)).fetchone()[0])


def drop_lease(conn, holder: str) -> None:
    """A process stopping: its lease and whatever it still holds go."""
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        conn.execute("DELETE FROM admissions WHERE holder = ?", (holder,))
        conn.execute("DELETE FROM limit_leases WHERE holder = ?", (holder,))


def in_flight(conn, key_id: int) -> tuple[int, float]:
    """(requests in flight, their reserved cost) of a key under live leases: for listings and tests."""
    pg = dialect(conn) == "postgresql"
    now = _now(conn, pg)
    row = conn.execute("SELECT COUNT(*), COALESCE(SUM(a.cost), 0) FROM admissions a JOIN limit_leases l"
                       " ON l.holder = a.holder WHERE a.key_id = ? AND a.live = 1 AND l.expires_at > ?",
                       (key_id, now)).fetchone()
    return int(row[0]), float(row[1])
