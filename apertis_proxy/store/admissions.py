"""Admissions: a key's quota, concurrency and requests per minute, decided in the store.

Every gateway process (worker or host) admits a limited key's request with one
transaction against the shared store, so the limits hold across all of them:

* ``admissions``: one row per admitted request not yet in the ledger.  While the
  request runs (``live = 1``) the row holds a concurrency slot and reserves an
  upper bound of the request's cost; once it ended (``live = 0``) the row holds
  its exact cost, and the UTC day the request started (``start``), until the
  ledger row is written, which deletes it in the same transaction that adds the
  cost to ``key_spend`` (ledger_write.py, pg_ledger.py).
* ``admission_ended``: per key and day, the number and the sum of the ended
  rows' exact costs, moved in the transactions that end and delete them, so a
  decision reads the days of its period (a lifetime quota: every day) whatever
  the ledger has not settled yet.  An ended request whose ledger row never lands
  (the ledger refused it, a meter failed) so counts its exact cost once, in the
  periods that hold its day and no later one, also when the key's quota period
  changed since; a lifetime quota keeps counting it.
* ``admission_times``: when each admission of the last minute happened, numbered
  per key in order (``seq``), so that a decision counts the minute's admissions
  from two rows: the first in the minute and the latest.  A lease's renewal
  deletes the rows that left the minute.
* ``limit_leases``: one row per gateway process, renewed every third of its
  length.  A live row of ``admissions`` counts only while its holder's lease runs, so
  a process killed with its slots and reservations frees them when its lease
  runs out, with no one cleaning up.  A process that renews a lease that had run
  out (its event loop stalled) takes it again, and its admissions count again;
  a lease run out for STALE_LEASE_SECONDS is deleted with its holder's live
  admissions.  Ended admissions are left to their ledger rows (they hold exact
  costs not yet in the spend), also when their process stops; those of a key
  with a quota period, started ENDED_KEPT_DAYS ago, count nowhere, and a renewal
  deletes them (a lifetime quota keeps counting them).

Time is the store's: SQLite serves one host, whose clock the deciding process
reads; PostgreSQL's ``clock_timestamp()`` is one clock for every host.
Admissions of a key are serialised by ``BEGIN IMMEDIATE`` (SQLite, the functions
below) or a transaction-scoped advisory lock on the key (PostgreSQL, the
function ``apertis_admit`` of pg_admissions.py); the spend, the ledger's
deletions and the admissions are read by one statement, one snapshot.

Refusals, in the order a client sees them: 402 the quota is used up (settled
spend plus ended requests' exact costs), 429 concurrency, 429 requests per
minute, 429 the request's bound does not fit beside the bounds in flight.  Costs
are compared at the ledger's precision (COST_TOLERANCE), so a quota spent to the
cent is reached although a sum of floating-point costs may fall short of it.  A
bound that does not fit while nothing else of the key is in flight is admitted:
the request runs alone, so a quota is overshot by at most one request's cost.
"""
from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from dataclasses import dataclass
from typing import Optional

from ..budgets.periods import period_start
from .budgets import add_period_spend
from .spend import add_key_spend

RPM_WINDOW = 60.0            # seconds
BUSY_RETRY_AFTER = 1         # seconds: a slot or some quota headroom usually frees up quickly
# A lease that ran out this long ago (its holder did not renew since) is deleted with its
# holder's live admissions (a lapsed lease's admissions stop counting at once; the rows
# only wait for garbage collection, or for the holder to renew and count them again).
STALE_LEASE_SECONDS = 600.0
# Ended admissions of requests that started this many days ago count in no periodic decision (every period
# that holds their day is over: a month has at most 31 days); a renewal deletes those of keys with a quota
# period.  A ledger row landing later settles its own period's spend alone.
ENDED_KEPT_DAYS = 32
# Half the ledger's quantum (costs are rounded to 1e-10 USD): sums of costs are floating-point (ten $0.10 rows
# sum to 0.9999999999999999), so two amounts of USD closer than this are the same amount.
COST_TOLERANCE = 0.5e-10


@dataclass(frozen=True, slots=True)
class Limits:
    """One key's limits as configured (None: no such limit)."""

    key_id: int
    quota_cost: Optional[float] = None
    quota_tokens: Optional[int] = None
    quota_period: Optional[str] = None     # day, week, month (UTC); None = lifetime
    rpm: Optional[int] = None
    concurrency: Optional[int] = None

    @property
    def holds_admission(self) -> bool:
        """Whether an admission keeps a row while the request runs (a slot or a reservation); with only a
        requests-per-minute limit it leaves only its time in the minute."""
        return self.concurrency is not None or self.quota_cost is not None or self.quota_tokens is not None


# Use and Decision are made for every admission: plain (not frozen) dataclasses, whose construction costs
# a fifth of a frozen one's; nothing changes them once made.
@dataclass(slots=True)
class Use:
    """What the store holds for one key at the moment of a decision."""

    spent_cost: float          # settled (ledger) plus ended requests' exact costs
    spent_tokens: int
    live: int                  # requests in flight (concurrency slots)
    live_cost: float           # their reserved bounds
    live_tokens: int
    recent: int                # admissions in the last minute
    # When the admission of the minute whose leaving brings `recent` under the limit was made (store clock): the
    # oldest of the minute, or a later one when the minute holds more than the limit (it was lowered).
    freeing_at: Optional[float]


@dataclass(frozen=True, slots=True)
class Renewal:
    """A lease renewed: the live leases (gateway processes), and how long the renewed lease had still
    to run (negative: it had run out, its admissions not counting meanwhile; None: there was none)."""

    holders: int
    left: Optional[float]


@dataclass(slots=True)
class Decision:
    """None of `reason` means admitted; else the refusal and what the client is told."""

    reason: Optional[str] = None       # quota, concurrency, rpm, quota_reserved
    retry_after: Optional[int] = None
    use: Optional[Use] = None
    holders: int = 1                   # live leases (gateway processes) when decided

    @property
    def admitted(self) -> bool:
        return self.reason is None


def decide(limits: Limits, use: Use, now: float, bound_cost: float, bound_tokens: int,
           holders: int = 1) -> Decision:
    """The decision for one request of `limits` given `use` (pure: the store calls it inside the
    transaction that records the admission); `holders` is passed on."""
    if limits.quota_cost is not None and cost_reached(use.spent_cost, limits.quota_cost):
        return Decision("quota", None, use, holders)
    if limits.quota_tokens is not None and use.spent_tokens >= limits.quota_tokens:
        return Decision("quota", None, use, holders)
    if limits.concurrency is not None and use.live >= limits.concurrency:
        return Decision("concurrency", BUSY_RETRY_AFTER, use, holders)
    if limits.rpm is not None and use.recent >= limits.rpm:
        freeing_at = use.freeing_at if use.freeing_at is not None else now
        return Decision("rpm", max(1, math.ceil(freeing_at + RPM_WINDOW - now)), use, holders)
    if use.live:
        if (limits.quota_cost is not None
                and use.spent_cost + use.live_cost + bound_cost > limits.quota_cost + COST_TOLERANCE):
            return Decision("quota_reserved", BUSY_RETRY_AFTER, use, holders)
        if (limits.quota_tokens is not None
                and use.spent_tokens + use.live_tokens + bound_tokens > limits.quota_tokens):
            return Decision("quota_reserved", BUSY_RETRY_AFTER, use, holders)
    return Decision(None, None, use, holders)


def cost_reached(spent: float, quota: float) -> bool:
    """Whether `spent` USD reached `quota` at the ledger's precision (COST_TOLERANCE)."""
    return spent >= quota - COST_TOLERANCE


# -- SQLite --------------------------------------------------------------------------------
# PostgreSQL runs the same decision as one function call (pg_admissions.py).

_SPEND_LIFETIME = "SELECT cost, tokens FROM key_spend WHERE key_id = ?1"
_SPEND_PERIOD = "SELECT cost, tokens FROM key_period_spend WHERE key_id = ?1 AND period = ?3 AND start = ?4"

# ?1 key id, ?2 now, (?3 period), ?4 its start ('' for a lifetime quota), ?5 the start of the minute (NULL
# without a requests-per-minute limit: no minute is then read).  Requests in flight count while their holder's
# lease runs; ended ones (exact costs, summed in admission_ended per day their requests started) count in the
# period that holds their day, whatever became of their holder, until their ledger rows settle them.
# A key's admissions are numbered without gaps and rows leave the minute oldest first, so the number of the
# first in the minute and of the key's latest count them: scalar subqueries, one seek each (a joined subquery
# would be materialised in a temporary B-tree, dearer than the seeks).
_USE = """
SELECT COALESCE(s.cost, 0)
       + COALESCE((SELECT SUM(cost) FROM admission_ended WHERE key_id = ?1 AND start >= ?4), 0),
       COALESCE(s.tokens, 0)
       + COALESCE((SELECT SUM(tokens) FROM admission_ended WHERE key_id = ?1 AND start >= ?4), 0),
       a.live, a.live_cost, a.live_tokens,
       (SELECT seq FROM admission_times WHERE key_id = ?1 AND at > ?5 ORDER BY at, seq LIMIT 1),
       (SELECT seq FROM admission_times WHERE key_id = ?1 AND ?5 IS NOT NULL ORDER BY at DESC, seq DESC LIMIT 1),
       (SELECT at FROM admission_times WHERE key_id = ?1 AND ?5 IS NOT NULL ORDER BY at DESC, seq DESC LIMIT 1),
       (SELECT COUNT(*) FROM limit_leases WHERE expires_at > ?2)
FROM (SELECT COUNT(*) AS live, COALESCE(SUM(a.cost), 0) AS live_cost, COALESCE(SUM(a.tokens), 0) AS live_tokens
      FROM admissions a INDEXED BY admissions_live JOIN limit_leases l ON l.holder = a.holder
      WHERE a.key_id = ?1 AND a.live = 1 AND l.expires_at > ?2) a
LEFT JOIN ({spend}) s ON 1 = 1
"""
_USE_LIFETIME = _USE.format(spend=_SPEND_LIFETIME)
_USE_PERIOD = _USE.format(spend=_SPEND_PERIOD)

_ADMIT = ("INSERT INTO admissions (key_id, request_id, holder, admitted_at, live, cost, tokens)"
          " VALUES (?, ?, ?, ?, 1, ?, ?)")
# The time of the key's admission at ?3 places after the first in the minute (after ?2): the one whose leaving
# frees a slot (0 but for a minute holding more admissions than a lowered limit).
_FREEING_AT = "SELECT at FROM admission_times WHERE key_id = ?1 AND at > ?2 ORDER BY at, seq LIMIT 1 OFFSET ?3"
_BACK_TO_NOW = "UPDATE admission_times SET at = ?1 WHERE key_id = ?2 AND at > ?1"
# Seconds a key's latest admission time may lie ahead of the clock before the clock counts as set back.
CLOCK_SLACK = 1.0
_ADMIT_TIME = "INSERT INTO admission_times (key_id, at, seq, request_id) VALUES (?, ?, ?, ?)"
# The rows that left the minute, key by key (each key's range found from the previous key, not by a scan).
_LEFT_MINUTE = """
DELETE FROM admission_times WHERE at <= ?1 AND key_id IN (
    WITH RECURSIVE k(id) AS (
        SELECT MIN(key_id) FROM admission_times
        UNION ALL SELECT (SELECT MIN(key_id) FROM admission_times WHERE key_id > k.id) FROM k WHERE k.id IS NOT NULL)
    SELECT id FROM k)
"""
RELEASE_ENDED = ("UPDATE admissions SET live = 0, cost = ?, tokens = ?, start = ? WHERE key_id = ?"
                 " AND request_id = ? AND live = 1")
_ENDED = ("INSERT INTO admission_ended (key_id, start, n, cost, tokens) VALUES (?, ?, 1, ?, ?)"
          " ON CONFLICT (key_id, start)"
          " DO UPDATE SET n = n + 1, cost = cost + excluded.cost, tokens = tokens + excluded.tokens")
RELEASE_FREE = "DELETE FROM admissions WHERE key_id = ? AND request_id = ? AND live = 1"
_RESERVED = "SELECT cost, tokens FROM admissions WHERE key_id = ? AND request_id = ? AND live = 1"
_RENEW = ("INSERT INTO limit_leases (holder, expires_at) VALUES (?, ?)"
          " ON CONFLICT (holder) DO UPDATE SET expires_at = excluded.expires_at")
_LEASE = "SELECT expires_at FROM limit_leases WHERE holder = ?"
# A lease long run out: its holder's slots and reservations go; ended admissions (exact costs) wait for
# their ledger rows, but those of keys with a quota period whose days are over go, with their sums (?1: the
# oldest day kept).
_PERIODIC_KEYS = "SELECT id FROM keys WHERE quota_period IS NOT NULL"
_COLLECT_ENDED = f"DELETE FROM admissions WHERE live = 0 AND start < ?1 AND key_id IN ({_PERIODIC_KEYS})"
_COLLECT_ENDED_SUMS = f"DELETE FROM admission_ended WHERE start < ?1 AND key_id IN ({_PERIODIC_KEYS})"
_COLLECT_LIVE = ("DELETE FROM admissions WHERE live = 1 AND holder IN"
                 " (SELECT holder FROM limit_leases WHERE expires_at < ?)")
_DROP_LIVE = "DELETE FROM admissions WHERE holder = ? AND live = 1"


def admit_step(conn, limits: Limits, request_id: str, holder: str, bound_cost: float,
               bound_tokens: int) -> Decision:
    """Decide on one request of `limits` and, when admitted, record it (SQLite, inside the write
    transaction SqliteAdmissions groups steps into, as every step below)."""
    key_id = limits.key_id
    now = time.time()
    window = None if limits.rpm is None else now - RPM_WINDOW
    if limits.quota_period is None:
        read, args = _USE_LIFETIME, (key_id, now, None, "", window)
    else:
        read, args = _USE_PERIOD, (key_id, now, limits.quota_period, period_start(limits.quota_period, now),
                                   window)
    row = conn.execute(read, args).fetchone()
    if row[7] is not None and row[7] > now + CLOCK_SLACK:
        # The wall clock was set back: the key's times ahead of it are brought back to now (their order by
        # number stays their order by time), so that they leave the minute a minute from now rather than a
        # minute after the clock catches up with them.
        conn.execute(_BACK_TO_NOW, (now, key_id))
        row = conn.execute(read, args).fetchone()
    first, last = row[5], row[6]
    use = Use(spent_cost=row[0], spent_tokens=row[1], live=row[2], live_cost=row[3], live_tokens=row[4],
              recent=0 if first is None else last - first + 1, freeing_at=None)
    holders = max(1, row[8])
    decision = decide(limits, use, now, bound_cost, bound_tokens, holders)
    if decision.reason == "rpm":
        freeing = conn.execute(_FREEING_AT, (key_id, window, use.recent - limits.rpm)).fetchone()
        use.freeing_at = None if freeing is None else freeing[0]
        decision = decide(limits, use, now, bound_cost, bound_tokens, holders)
    elif decision.admitted:
        if limits.holds_admission:
            conn.execute(_ADMIT, (key_id, request_id, holder, now, bound_cost, bound_tokens))
        if window is not None:
            # Numbered after the key's latest admission, and not before it (a clock set back): the rows'
            # order by time stays their order by number.
            if last is None:
                conn.execute(_ADMIT_TIME, (key_id, now, 1, request_id))
            else:
                conn.execute(_ADMIT_TIME, (key_id, max(now, row[7]), last + 1, request_id))
    return decision


def release_step(conn, key_id: int, request_id: str, cost: Optional[float], tokens: Optional[int],
                 settled_by_ledger: bool, period: Optional[str] = None, start: Optional[str] = None,
                 retry: bool = False) -> None:
    """A request ended: its slot is free.  With the ledger settling spend, its reservation becomes its
    exact cost, kept under `start`, the UTC day its request started, until the ledger row deletes it (a
    request that cost nothing is forgotten at once); else its cost is added to the key's spend here, and
    to `period`'s starting on `start`, in the same transaction as the deletion.  Without
    a ledger, a first release settles the cost also when the admission is gone (collected with a lease
    run out STALE_LEASE_SECONDS ago: its process had stalled); a `retry` only while it is still there
    (an earlier try may have committed).  A `cost` of None (no price for the request's usage, or its usage
    unknown: the upstream may bill it) keeps the reserved bound as the request's cost, and `tokens` of None
    the reserved tokens."""
    if cost is None or tokens is None:
        row = conn.execute(_RESERVED, (key_id, request_id)).fetchone() or (0.0, 0)
        cost, tokens = row[0] if cost is None else cost, row[1] if tokens is None else tokens
    if settled_by_ledger:
        if cost or tokens:
            start = start or ""
            if conn.execute(RELEASE_ENDED, (cost, tokens, start, key_id, request_id)).rowcount:
                conn.execute(_ENDED, (key_id, start, cost, tokens))
        else:
            conn.execute(RELEASE_FREE, (key_id, request_id))
        return
    found = conn.execute(RELEASE_FREE, (key_id, request_id)).rowcount
    if (retry and not found) or not (cost or tokens):
        return
    if add_key_spend(conn, key_id, cost, tokens) and period is not None and start is not None:
        add_period_spend(conn, [(key_id, period, start, cost, tokens)])


def renew_step(conn, holder: str, seconds: float) -> "Renewal":
    """Extend `holder`'s lease to now + `seconds` (taking it again if it had run out, so that its
    admissions count again); drop leases run out STALE_LEASE_SECONDS ago with their holders' live
    admissions, ended admissions of keys with a quota period whose days are over, and the admission
    times that left the minute (SQLite)."""
    now = time.time()
    prior = conn.execute(_LEASE, (holder,)).fetchone()
    conn.execute(_RENEW, (holder, now + seconds))
    stale = now - STALE_LEASE_SECONDS
    conn.execute(_COLLECT_LIVE, (stale,))
    conn.execute("DELETE FROM limit_leases WHERE expires_at < ?", (stale,))
    oldest_kept = oldest_day_kept(now)
    conn.execute(_COLLECT_ENDED, (oldest_kept,))
    conn.execute(_COLLECT_ENDED_SUMS, (oldest_kept,))
    conn.execute(_LEFT_MINUTE, (now - RPM_WINDOW,))
    holders = int(conn.execute("SELECT COUNT(*) FROM limit_leases WHERE expires_at > ?", (now,)).fetchone()[0])
    return Renewal(holders, None if prior is None else prior[0] - now)


def oldest_day_kept(now: float) -> str:
    """The oldest UTC day whose ended admissions are kept for keys with a quota period (ENDED_KEPT_DAYS)."""
    return time.strftime("%Y-%m-%d", time.gmtime(now - ENDED_KEPT_DAYS * 86400))


def drop_step(conn, holder: str) -> None:
    """A process stopping: its lease and its live admissions go.  Ended ones stay: each holds an exact cost
    the ledger row adds to the spend, deleting it (ledger_write.py)."""
    conn.execute(_DROP_LIVE, (holder,))
    conn.execute("DELETE FROM limit_leases WHERE holder = ?", (holder,))


def in_flight(conn, key_id: int) -> tuple[int, float]:
    """(requests in flight, their reserved cost) of a key under live leases: for listings and tests."""
    row = conn.execute("SELECT COUNT(*), COALESCE(SUM(a.cost), 0) FROM admissions a JOIN limit_leases l"
                       " ON l.holder = a.holder WHERE a.key_id = ? AND a.live = 1 AND l.expires_at > ?",
                       (key_id, time.time())).fetchone()
    return int(row[0]), float(row[1])


# How long admissions wait for SQLite's write lock before the store counts as unreachable, and the
# longest pause between tries (the loop keeps serving meanwhile).
LOCK_WAIT = 10.0
LOCK_RETRY_MAX = 0.002


class SqliteAdmissions:
    """Admissions of one gateway process on SQLite, from its event loop, with group commit.

    Every step asked for while the loop runs one iteration (admissions, releases, the lease) goes
    into one write transaction on the process's own connection, made from a callback on the loop:
    the commit, most of a step's cost, is shared by all of them, and no thread hop is taken.  The
    connection never waits inside SQLite for the write lock (busy timeout 0, and no checkpoints:
    the ledger's connection makes those); a transaction that finds the lock taken is tried again
    from the loop after a short pause, up to LOCK_WAIT seconds."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: Optional[sqlite3.Connection] = None
        self._cursor: Optional[sqlite3.Cursor] = None
        self._queue: list = []
        self._handle = None
        self._waiting_since: Optional[float] = None

    async def open(self) -> "SqliteAdmissions":
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        conn.execute("PRAGMA synchronous=NORMAL")      # WAL: durable at the next checkpoint, like the ledger
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        self._conn = conn
        # The steps run on one cursor, reused: Connection.execute makes a new one per statement.
        self._cursor = conn.cursor()
        return self

    async def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = self._cursor = None

    def _submit(self, step, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((step, args, future))
        if self._handle is None:
            self._handle = loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._handle = None
        batch, self._queue = self._queue, []
        if batch:
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - nobody waits forever
                _fail(batch, exc)

    def _run(self, batch: list, one_by_one: bool = False) -> None:
        conn = self._conn
        try:
            # On the reused cursor, as COMMIT: Connection.execute would make a cursor for each.
            self._cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _busy(exc) and self._retry(batch):
                return
            return _fail(batch, exc)
        self._waiting_since = None
        alone = len(batch) == 1
        if not (alone or one_by_one):
            # The common case: every step of the group in one go, with no savepoint (a savepoint copies
            # each page a step changes into its journal).  A failing step rolls the whole group back, and
            # it runs again step by step.
            try:
                cursor = self._cursor
                outcomes = [(future, step(cursor, *args), None) for step, args, future in batch]
            except Exception:  # noqa: BLE001 - run again step by step, the failing step's caller gets it
                _abort(conn)
                return self._run(batch, one_by_one=True)
            return self._commit(conn, self._cursor, batch, outcomes)
        # Step by step, each under a savepoint of its own: a step that fails is undone alone and its caller
        # gets the error, the others commit together.  An error that ended the whole transaction (SQLite
        # rolls back by itself on a full disk or an I/O error) fails every step: none of them stays, and
        # nothing runs after it outside the group.
        outcomes = []
        for step, args, future in batch:
            try:
                if not alone:
                    conn.execute("SAVEPOINT step")
                result = step(self._cursor, *args)
                if not alone:
                    conn.execute("RELEASE step")
                outcomes.append((future, result, None))
            except Exception as exc:  # noqa: BLE001 - that step's caller gets it; the others go on
                if not alone and _undo(conn, "step"):
                    outcomes.append((future, None, exc))
                    continue
                _abort(conn)
                if not future.done():
                    future.set_exception(exc)
                return _fail(batch, exc)
        self._commit(conn, self._cursor, batch, outcomes)

    @staticmethod
    def _commit(conn, cursor, batch: list, outcomes: list) -> None:
        try:
            cursor.execute("COMMIT")
        except sqlite3.Error as exc:
            _abort(conn)
            return _fail(batch, exc)
        for future, result, exc in outcomes:
            if not future.done():
                if exc is None:
                    future.set_result(result)
                else:
                    future.set_exception(exc)

    def _retry(self, batch: list) -> bool:
        """Put `batch` back in front and try again shortly; False once the lock was waited for too long."""
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        waited = now - self._waiting_since
        if waited > LOCK_WAIT:
            self._waiting_since = None
            return False
        if self.release_bound is not None and waited > self.release_bound:
            batch = _without_late_releases(batch)
            if not batch:
                self._waiting_since = None
                return True
        self._queue[:0] = batch
        delay = min(LOCK_RETRY_MAX, 0.0002 + waited / 10)
        self._handle = asyncio.get_running_loop().call_later(delay, self._flush)
        return True

    # admit() and release() hand back the step's future itself (awaited as a coroutine would be): no
    # coroutine of their own on the request path.
    def admit(self, limits: Limits, request_id: str, holder: str, bound_cost: float,
              bound_tokens: int) -> "asyncio.Future[Decision]":
        return self._submit(admit_step, limits, request_id, holder, bound_cost, bound_tokens)

    def release(self, key_id: int, request_id: str, cost: Optional[float], tokens: Optional[int],
                settled_by_ledger: bool, period: Optional[str] = None, start: Optional[str] = None,
                retry: bool = False) -> "asyncio.Future[None]":
        return self._submit(release_step, key_id, request_id, cost, tokens, settled_by_ledger, period, start,
                            retry)

    async def renew_lease(self, holder: str, seconds: float) -> Renewal:
        return await self._submit(renew_step, holder, seconds)

    async def drop_lease(self, holder: str) -> None:
        await self._submit(drop_step, holder)

    tidy_interval: Optional[float] = None       # SQLite frees a deleted row's space at once: no tidy()
    # Seconds a release (not a retry) may wait for the write lock: then it fails with ReleaseNotRun, not run,
    # and its caller retries it later.  Set by the limiter (its RELEASE_TIMEOUT), which then need not time
    # the wait itself; None: a release waits up to LOCK_WAIT, as every step.
    release_bound: Optional[float] = None

    async def in_flight(self, key_id: int) -> tuple[int, float]:
        return await self._submit(in_flight, key_id)


class ReleaseNotRun(TimeoutError):
    """A release the store never ran (on SQLite it waited too long for the write lock; on PostgreSQL no
    connection took it): made again, it is still a first release (release_step's `retry` is for a release
    that may have committed)."""


def _without_late_releases(batch: list) -> list:
    """`batch` less its releases (retries excepted), which fail with ReleaseNotRun."""
    kept = []
    for entry in batch:
        step, args, future = entry
        if step is release_step and not args[-1]:
            if not future.done():
                future.set_exception(ReleaseNotRun("the release waited too long for the store's write lock"))
        else:
            kept.append(entry)
    return kept


def _fail(batch: list, exc: BaseException) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(sqlite3.OperationalError(f"the store takes no writes now: {exc}"))


def _abort(conn) -> None:
    """Roll back whatever of the group's transaction is left."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass        # SQLite ended it itself meanwhile


def _undo(conn, savepoint: str) -> bool:
    """Undo what ran since `savepoint`; False when the transaction itself is gone."""
    if not conn.in_transaction:
        return False
    try:
        conn.execute(f"ROLLBACK TO {savepoint}")
        conn.execute(f"RELEASE {savepoint}")
    except sqlite3.Error:
        return False
    return conn.in_transaction


def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text
