"""Admissions on PostgreSQL: the decision of admissions.py as a function call, made from the gateway's own
event loop through an asyncpg pool (no thread in between).  The admissions asked for while the loop runs go
together as one call, the releases as one statement (gathered.py): one round trip and one transaction for
each batch instead of each request.

``apertis_admit_many`` takes an advisory lock on each of the batch's keys for its transaction, in ascending
order (so the hosts' admissions of one key take turns, and two batches never wait on each other in a cycle),
then decides the requests one after the other, each as a call of its own would: it reads the spend, the
requests in flight under live leases, the ended requests' sums and the minute's count in one statement (one
snapshot, which sees the batch's earlier admissions, and in which a ledger row committed meanwhile counts
once: as spend or as an ended admission), decides in the order of ``admissions.decide`` and records the
admission with one more.  A release adds to its key's ended sums; the ledger takes its rows out of them in the
last statement of its transaction (pg_ledger.py), so that a release waits on the ledger's lock of that row for
a moment at most.  A batch of one calls ``apertis_admit`` instead: the same decision on its arguments as they are,
which spares the server the arrays, the loop and the set of rows (the server's CPU per call is mostly the
start-up of each statement's executor, so every statement, expression and plan node counts).
``tests/ops/test_admissions_store.py`` runs the same cases on both backends, ``tests/ops/test_pg_admission_batches.py``
the batches.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from .admissions import (BUSY_RETRY_AFTER, CLOCK_SLACK, COST_TOLERANCE, ENDED_KEPT_DAYS, RPM_WINDOW,
                         STALE_LEASE_SECONDS, Decision, Limits, ReleaseNotRun, Renewal, Use)
from .gathered import Gathered
from .service import StoreUnavailable
from .url import StoreURL

POOL_SIZE = 8
# Admissions (and, apart, releases) asked for while the event loop runs go to the server together, in one
# call: up to BATCH_MOST of them, with up to BATCHES_IN_FLIGHT such calls out at once (gathered.py).
BATCH_MOST = 256
BATCHES_IN_FLIGHT = 2
# Tables every request writes to and deletes from.
CHURNING_TABLES = ("admissions", "admission_ended", "admission_times", "admission_counts")
CONNECT_TIMEOUT = 10.0
# Seconds an admission, a release or a renewal may wait for the database (a free connection, a new
# one, a statement's answer) before the store counts as unavailable.
STATEMENT_TIMEOUT = 5.0
# pg_advisory_xact_lock(bigint) namespace for admissions: this << 32 | key id.
ADMISSION_LOCK = 0x61647331
# The same for settling: every transaction that settles or deletes admissions (a release batch, a ledger write,
# a release without a ledger, a lease dropped or collected) takes its keys' locks of this namespace in ascending
# order before its first row lock, so that two of them sharing keys (and so admissions, ended sums, spend rows)
# take turns on them instead of locking those rows in opposite orders.  A lock in memory, unlike an ordered
# FOR UPDATE of every row, which writes each row once more.
SETTLE_LOCK = 0x61647332


def settle_lock(key: str) -> str:
    """The SQL call that takes the settling lock of the key id `key` (an SQL expression)."""
    return f"pg_advisory_xact_lock(({SETTLE_LOCK}::BIGINT << 32) | {key})"


def settle_locks(param: int) -> str:
    """A query that takes the settling locks of the keys in its BIGINT[] parameter `$param` (ascending,
    distinct) in that order; its one value is a count, to be read so that every lock is taken."""
    return f"SELECT COUNT(*) FROM (SELECT {settle_lock('k')} FROM unnest(${param}::BIGINT[]) AS k) l"


# The settling locks of the keys in $1, as one statement.
TAKE_SETTLE_LOCKS = settle_locks(1)

# The admissions' connections commit without waiting for the WAL to reach the disk (the server's
# wal_writer_delay later, 200 ms by default): an admission and a release cost no disk flush.  A crash
# of the server loses at most the last of them: requests then in flight stop counting (as if their
# process had died), and the minute forgets the admissions of that moment.  Ended requests' costs are
# not lost: the ledger commits durably (and a commit makes every earlier one durable too), and without
# a ledger the release that adds a cost to the spend commits durably itself (_release_and_settle).
# Over TCP the server also probes an idle connection every minute: a NAT or firewall on the way keeps its
# mapping, and a peer gone without a word is found (unix sockets ignore these).
SESSION_SETTINGS = {"synchronous_commit": "off", "tcp_keepalives_idle": "60", "tcp_keepalives_interval": "10",
                    "tcp_keepalives_count": "6"}
# A pooled connection unused for longer is closed when next taken and a new one opened: freed last, used first,
# the connections under a burst's may sit idle for hours (as asyncpg's own pool, max_inactive_connection_lifetime).
MAX_IDLE_SECONDS = 300.0

def _decision(spend: str) -> str:
    """The statement that reads what decides an admission of v_key (see the module docstring), its spend
    from `spend` (joined as sp)."""
    return f"""SELECT COALESCE(sp.cost, 0) + COALESCE(e.cost, 0), COALESCE(sp.tokens, 0) + COALESCE(e.tokens, 0),
               ad.in_flight, ad.in_flight_cost, ad.in_flight_tokens,
               CASE WHEN v_rpm IS NULL THEN 0 ELSE
                   COALESCE((SELECT c.n FROM admission_counts c WHERE c.key_id = v_key), 0)
                   - (SELECT COUNT(*) FROM admission_times t WHERE t.key_id = v_key AND t.at <= v_now - {RPM_WINDOW})
               END,
               (SELECT COUNT(*) FROM limit_leases l WHERE l.expires_at > v_now)
          INTO spent_cost, spent_tokens, live, live_cost, live_tokens, recent, holders
          FROM (SELECT COUNT(*) AS in_flight, COALESCE(SUM(a.cost), 0) AS in_flight_cost,
                       COALESCE(SUM(a.tokens), 0)::BIGINT AS in_flight_tokens
                  FROM admissions a JOIN limit_leases l ON l.holder = a.holder
                 WHERE a.key_id = v_key AND a.live = 1 AND l.expires_at > v_now) ad
          LEFT JOIN (SELECT SUM(x.cost) AS cost, SUM(x.tokens)::BIGINT AS tokens FROM admission_ended x
                      WHERE x.key_id = v_key AND x.start >= v_start) e ON TRUE
          LEFT JOIN {spend} sp ON sp.key_id = v_key"""


# The read of the key's use, from key_spend without a quota period (a statement of its own, so that the executor
# starts only the one the request reads).
_READ = f"""
        IF v_period IS NULL THEN
            {_decision("key_spend")};
        ELSE
            {_decision("key_period_spend")} AND sp.period = v_period AND sp.start = v_start;
        END IF;"""

# One admission decided and, if admitted, recorded: the body both functions share, on the variables v_key,
# v_request, v_holder, v_cost, v_tokens, v_quota_cost, v_quota_tokens, v_period, v_rpm, v_concurrency (the
# request), v_now, v_start, v_freeing_at (its own) and the output columns (reason and retry_after NULL on entry).
_DECIDE = f"""
        v_now := extract(epoch FROM clock_timestamp());
        -- One statement, one snapshot (which sees the batch's earlier admissions): the spend, the key's
        -- admissions (in flight: under a live lease; ended: summed per key and day whatever their holder,
        -- until their ledger rows settle them; the days of the current period count, every day for a lifetime
        -- quota), the minute's count less the times that left it (deleted by the next admission), the live
        -- leases.
        v_start := '';
        IF v_period IS NOT NULL THEN
            v_start := to_char(date_trunc(CASE v_period WHEN 'week' THEN 'week' WHEN 'month' THEN 'month'
                                                        ELSE 'day' END,
                                          to_timestamp(v_now) AT TIME ZONE 'UTC'), 'YYYY-MM-DD');
        END IF;{_READ}
        IF v_rpm IS NOT NULL AND recent >= v_rpm THEN
            -- A full minute may hold times ahead of the clock (the server's clock was set back): they would
            -- count until it caught up with them.  Brought back to now, they leave the minute a minute from
            -- now; then the key is read again.
            UPDATE admission_times t SET at = v_now WHERE t.key_id = v_key AND t.at > v_now + {CLOCK_SLACK};
            IF FOUND THEN{_READ}
            END IF;
        END IF;
        -- USD compared at the ledger's precision (admissions.COST_TOLERANCE).
        IF (v_quota_cost IS NOT NULL AND spent_cost >= v_quota_cost - {COST_TOLERANCE})
                OR (v_quota_tokens IS NOT NULL AND spent_tokens >= v_quota_tokens) THEN
            reason := 'quota';
        ELSIF v_concurrency IS NOT NULL AND live >= v_concurrency THEN
            reason := 'concurrency';
            retry_after := {BUSY_RETRY_AFTER};
        ELSIF v_rpm IS NOT NULL AND recent >= v_rpm THEN
            -- A slot frees when the admission that brings the minute under the limit leaves it: the oldest, or a
            -- later one when the minute holds more than a lowered limit.
            SELECT t.at INTO v_freeing_at FROM admission_times t
             WHERE t.key_id = v_key AND t.at > v_now - {RPM_WINDOW} ORDER BY t.at LIMIT 1 OFFSET recent - v_rpm;
            reason := 'rpm';
            retry_after := GREATEST(1, ceil(COALESCE(v_freeing_at, v_now) + {RPM_WINDOW} - v_now))::INTEGER;
        ELSIF live > 0 AND ((v_quota_cost IS NOT NULL
                             AND spent_cost + live_cost + v_cost > v_quota_cost + {COST_TOLERANCE})
                OR (v_quota_tokens IS NOT NULL AND spent_tokens + live_tokens + v_tokens > v_quota_tokens)) THEN
            reason := 'quota_reserved';
            retry_after := {BUSY_RETRY_AFTER};
        -- Admitted: recorded by one statement (the slot or reservation; with a requests-per-minute limit
        -- the time, the times that left the minute deleted, and the count moved by both).
        ELSIF v_rpm IS NULL THEN
            INSERT INTO admissions (request_id, key_id, holder, admitted_at, live, cost, tokens)
                VALUES (v_request, v_key, v_holder, v_now, 1, v_cost, v_tokens);
        ELSE
            WITH gone AS (DELETE FROM admission_times t WHERE t.key_id = v_key AND t.at <= v_now - {RPM_WINDOW}
                          RETURNING 1),
                 timed AS (INSERT INTO admission_times (key_id, at, request_id) VALUES (v_key, v_now, v_request)),
                 held AS (INSERT INTO admissions (request_id, key_id, holder, admitted_at, live, cost, tokens)
                          SELECT v_request, v_key, v_holder, v_now, 1, v_cost, v_tokens
                           WHERE v_concurrency IS NOT NULL OR v_quota_cost IS NOT NULL
                                 OR v_quota_tokens IS NOT NULL)
            INSERT INTO admission_counts AS c (key_id, n, last_at) VALUES (v_key, 1, v_now)
                ON CONFLICT (key_id) DO UPDATE SET n = c.n + 1 - (SELECT COUNT(*) FROM gone),
                                                   last_at = EXCLUDED.last_at;
        END IF;"""

_DECIDE_LOCALS = """
    v_now DOUBLE PRECISION;
    v_start TEXT;
    v_freeing_at DOUBLE PRECISION;"""

FUNCTIONS = f"""
CREATE OR REPLACE FUNCTION apertis_admit_many(
    p_keys BIGINT[], p_requests TEXT[], p_holders TEXT[], p_costs DOUBLE PRECISION[], p_tokens BIGINT[],
    p_quota_costs DOUBLE PRECISION[], p_quota_tokens BIGINT[], p_periods TEXT[], p_rpms BIGINT[],
    p_concurrencies BIGINT[], p_locks BIGINT[])
RETURNS TABLE (reason TEXT, retry_after INTEGER, spent_cost DOUBLE PRECISION, spent_tokens BIGINT,
    live BIGINT, live_cost DOUBLE PRECISION, live_tokens BIGINT, recent BIGINT, holders BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE{_DECIDE_LOCALS}
    v_key BIGINT;
    v_request TEXT;
    v_holder TEXT;
    v_cost DOUBLE PRECISION;
    v_tokens BIGINT;
    v_quota_cost DOUBLE PRECISION;
    v_quota_tokens BIGINT;
    v_period TEXT;
    v_rpm BIGINT;
    v_concurrency BIGINT;
BEGIN
    -- p_locks: the distinct keys in ascending order, so two batches sharing keys never wait on each other.
    PERFORM pg_advisory_xact_lock(({ADMISSION_LOCK}::BIGINT << 32) | k) FROM unnest(p_locks) AS k;
    FOR i IN 1 .. cardinality(p_keys) LOOP
        v_key := p_keys[i]; v_request := p_requests[i]; v_holder := p_holders[i]; v_cost := p_costs[i];
        v_tokens := p_tokens[i]; v_quota_cost := p_quota_costs[i]; v_quota_tokens := p_quota_tokens[i];
        v_period := p_periods[i]; v_rpm := p_rpms[i]; v_concurrency := p_concurrencies[i];
        reason := NULL;
        retry_after := NULL;{_DECIDE}
        RETURN NEXT;
    END LOOP;
END $$;

-- One admission: a batch of one (and the call of the hosts of PG revision 0, which do not batch).  The same
-- body on its arguments as they are: no arrays to take apart, no set of rows to return.
CREATE OR REPLACE FUNCTION apertis_admit(
    p_key BIGINT, p_request TEXT, p_holder TEXT, p_cost DOUBLE PRECISION, p_tokens BIGINT,
    p_quota_cost DOUBLE PRECISION, p_quota_tokens BIGINT, p_period TEXT, p_rpm BIGINT, p_concurrency BIGINT,
    OUT reason TEXT, OUT retry_after INTEGER, OUT spent_cost DOUBLE PRECISION, OUT spent_tokens BIGINT,
    OUT live BIGINT, OUT live_cost DOUBLE PRECISION, OUT live_tokens BIGINT, OUT recent BIGINT,
    OUT holders BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE{_DECIDE_LOCALS}
    v_key ALIAS FOR p_key;
    v_request ALIAS FOR p_request;
    v_holder ALIAS FOR p_holder;
    v_cost ALIAS FOR p_cost;
    v_tokens ALIAS FOR p_tokens;
    v_quota_cost ALIAS FOR p_quota_cost;
    v_quota_tokens ALIAS FOR p_quota_tokens;
    v_period ALIAS FOR p_period;
    v_rpm ALIAS FOR p_rpm;
    v_concurrency ALIAS FOR p_concurrency;
BEGIN
    PERFORM pg_advisory_xact_lock(({ADMISSION_LOCK}::BIGINT << 32) | v_key);{_DECIDE}
END $$;
"""

_ADMIT = "SELECT * FROM apertis_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_ADMIT_MANY = """SELECT * FROM apertis_admit_many($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::DOUBLE PRECISION[],
    $5::BIGINT[], $6::DOUBLE PRECISION[], $7::BIGINT[], $8::TEXT[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[])"""
# Releases settled by the ledger, as admissions.release_step one after the other: a request that cost nothing
# is forgotten; else its reservation becomes its exact cost, added to its key's ended sums for the day its
# request started (start) in the batch's order (a sum seeded with the row's value: the same floating-point
# additions as one release at a time).
# The batch's keys' settling locks (SETTLE_LOCK, $6) come first: `f`, which every other part reads, waits for
# them.  Then the admissions of requests that cost nothing go before the others end (`(SELECT COUNT(*) FROM
# freed) >= 0` is a one-time filter: the update it gates starts only once the deletion has run to its end), and
# the ended sums are upserted last, in ascending order of key and day.
_RELEASE_MANY = f"""
WITH f AS (SELECT * FROM unnest($1::BIGINT[], $2::TEXT[], $3::DOUBLE PRECISION[], $4::BIGINT[], $5::TEXT[])
                         WITH ORDINALITY AS f (key_id, request_id, cost, tokens, start, ord)
           WHERE ({settle_locks(6)}) >= 0),
freed AS (DELETE FROM admissions a USING f
          WHERE a.key_id = f.key_id AND a.request_id = f.request_id AND a.live = 1 AND f.cost = 0 AND f.tokens = 0
          RETURNING a.key_id),
ended AS (UPDATE admissions a SET live = 0, cost = f.cost, tokens = f.tokens, start = f.start FROM f
          WHERE (SELECT COUNT(*) FROM freed) >= 0
            AND a.key_id = f.key_id AND a.request_id = f.request_id AND a.live = 1 AND (f.cost <> 0 OR f.tokens <> 0)
          RETURNING f.key_id, f.start, f.ord, f.cost, f.tokens)
INSERT INTO admission_ended AS e (key_id, start, n, cost, tokens)
SELECT key_id, start, COUNT(*), SUM(cost ORDER BY ord), SUM(tokens) FROM ended GROUP BY key_id, start
ORDER BY key_id, start
ON CONFLICT (key_id, start) DO UPDATE SET n = e.n + EXCLUDED.n,
    cost = (SELECT SUM(s.cost ORDER BY s.ord) FROM (SELECT 0 AS ord, e.cost UNION ALL
            SELECT x.ord, x.cost FROM ended x WHERE x.key_id = e.key_id AND x.start = e.start) s),
    tokens = e.tokens + EXCLUDED.tokens
"""
# One release alone (the batches of a light load), as _RELEASE_MANY with less for the server to plan and run.
_RELEASE_ENDED = """
WITH ended AS (UPDATE admissions SET live = 0, cost = $3, tokens = $4, start = $5
               WHERE key_id = $1 AND request_id = $2 AND live = 1 RETURNING key_id)
INSERT INTO admission_ended AS e (key_id, start, n, cost, tokens) SELECT key_id, $5, 1, $3, $4 FROM ended
ON CONFLICT (key_id, start) DO UPDATE SET n = e.n + 1, cost = e.cost + EXCLUDED.cost,
    tokens = e.tokens + EXCLUDED.tokens
"""
_RELEASE_FREE = "DELETE FROM admissions WHERE key_id = $1 AND request_id = $2 AND live = 1 RETURNING key_id"
# A live admission's reserved bound, locked until the release that makes it the request's cost.
_RESERVED = "SELECT cost, tokens FROM admissions WHERE key_id = $1 AND request_id = $2 AND live = 1 FOR UPDATE"
# The lease renewed (taken again if it had run out), as admissions.renew_step: a lease run out for
# STALE_LEASE_SECONDS goes with its holder's live admissions, and ended admissions of keys with a quota period
# whose requests started before `kept` (ENDED_KEPT_DAYS ago) with their sums, but not those a ledger write holds at
# that moment (it settles them; the next renewal takes what is left).  The lease is renewed first, and a stale
# lease another transaction holds is skipped: a holder renewing at that moment keeps its lease and its admissions,
# and two stale holders renewing at once (every host back after an outage) never wait on each other.  The stale
# holders' live admissions go under their keys' settling locks (a ledger write may be settling some of them), taken
# after the leases (as drop_lease does) and before any admission is locked.
# The minutes of keys idle for one go too, but not a minute an admission holds at that moment (it may hold other
# keys' too, in a batch: waiting for it could close a cycle); the next renewal takes it if it is still idle.
# Returns how long the lease had still to run (NULL: none) and the live leases.
_RENEW = f"""
WITH clock AS (SELECT extract(epoch FROM clock_timestamp()) AS now),
cutoff AS (SELECT to_char(to_timestamp(clock.now - {ENDED_KEPT_DAYS * 86400}) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS kept
           FROM clock),
periodic AS (SELECT k.id FROM keys k WHERE k.quota_period IS NOT NULL),
prior AS (SELECT l.expires_at FROM limit_leases l WHERE l.holder = $1),
renewed AS (
    INSERT INTO limit_leases (holder, expires_at) SELECT $1, clock.now + $2 FROM clock
    ON CONFLICT (holder) DO UPDATE SET expires_at = EXCLUDED.expires_at RETURNING holder),
gone AS (
    DELETE FROM limit_leases l WHERE (SELECT COUNT(*) FROM renewed) >= 0 AND l.holder IN (
        SELECT s.holder FROM limit_leases s, clock
         WHERE s.expires_at < clock.now - {STALE_LEASE_SECONDS} AND s.holder <> $1
        FOR UPDATE OF s SKIP LOCKED)
    RETURNING l.holder),
gone_keys AS (SELECT COUNT(*) AS n FROM (
    SELECT {settle_lock('k.key_id')} FROM (
        SELECT DISTINCT a.key_id FROM admissions a JOIN gone ON a.holder = gone.holder WHERE a.live = 1
        ORDER BY a.key_id) k) l),
collected AS (DELETE FROM admissions a USING gone
              WHERE (SELECT n FROM gone_keys) >= 0 AND a.holder = gone.holder AND a.live = 1),
idle AS (
    DELETE FROM admission_counts c WHERE c.key_id IN (
        SELECT i.key_id FROM admission_counts i, clock WHERE i.last_at <= clock.now - {RPM_WINDOW}
        FOR UPDATE OF i SKIP LOCKED)
    RETURNING c.key_id),
idle_times AS (DELETE FROM admission_times t USING idle WHERE t.key_id = idle.key_id),
old_ended AS (
    DELETE FROM admissions a WHERE (a.key_id, a.request_id) IN (
        SELECT o.key_id, o.request_id FROM admissions o, cutoff
         WHERE (SELECT n FROM gone_keys) >= 0
           AND o.live = 0 AND o.start < cutoff.kept AND o.key_id IN (SELECT id FROM periodic)
        FOR UPDATE OF o SKIP LOCKED)),
old_sums AS (
    DELETE FROM admission_ended e WHERE (e.key_id, e.start) IN (
        SELECT o.key_id, o.start FROM admission_ended o, cutoff
         WHERE o.start < cutoff.kept AND o.key_id IN (SELECT id FROM periodic)
        FOR UPDATE OF o SKIP LOCKED))
SELECT (SELECT prior.expires_at FROM prior) - clock.now,
       1 + (SELECT COUNT(*) FROM limit_leases l WHERE l.expires_at > clock.now AND l.holder <> $1)
FROM clock
"""


class PgAdmissions:
    """Admissions of one gateway process on PostgreSQL, from its event loop: up to POOL_SIZE connections of
    its own, used as they are (no reset query between uses, which would double the round trips); a lost one
    is opened again by the next use.  The connection freed last is the next one used (and a connection is
    opened only when all open ones are busy): a light load keeps to one server process, whose caches stay
    warm, instead of taking turns with POOL_SIZE of them (which costs the server about 40% more CPU a call).
    One that sat unused for MAX_IDLE_SECONDS is replaced when next taken.
    The lease is renewed on a connection of its own, so that admissions waiting for the pool never hold it
    back.

    Nothing waits on the database for longer than `timeout`: not for a free connection of the pool, nor for
    a connection to open, nor for a statement's answer.  A connection whose statement did not answer in
    time is closed (it may be stuck in the middle of a transaction) and the caller gets StoreUnavailable."""

    tidy_interval: Optional[float] = 2.0        # seconds between tidy() calls

    def __init__(self, url: StoreURL, timeout: float = STATEMENT_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        refused = _server_errors()
        self._admissions = Gathered(self._admit_many, refused, BATCHES_IN_FLIGHT, BATCH_MOST)
        self._releases = Gathered(self._release_many, refused, BATCHES_IN_FLIGHT, BATCH_MOST,
                                  distinct=lambda item: item[:2])
        self._idle: asyncio.LifoQueue = asyncio.LifoQueue()
        self._freed_at: dict = {}               # connection -> loop time it went back to the pool
        self._open: list = []
        self._lease_conn = None

    async def open(self) -> "PgAdmissions":
        for _ in range(POOL_SIZE - 1):
            self._idle.put_nowait(None)         # opened when first needed (taken after the open ones)
        conn = await self._connect(CONNECT_TIMEOUT)
        self._freed_at[conn] = asyncio.get_running_loop().time()
        self._idle.put_nowait(conn)
        return self

    async def _connect(self, timeout: float):
        import asyncpg
        try:
            conn = await asyncpg.connect(self.url.dsn, timeout=timeout, server_settings=SESSION_SETTINGS)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"the limits store did not take a connection within {timeout:g}s") from None
        self._open.append(conn)
        return conn

    def _discard(self, conn) -> None:
        if conn is not None:
            conn.terminate()
            self._freed_at.pop(conn, None)
            if conn in self._open:
                self._open.remove(conn)

    async def _bounded(self, conn, work):
        """`await work(conn)`, the connection closed if it does not answer within `timeout` (which ends
        whatever waits on it at once, unlike a cancellation: asyncpg would wait for the server to confirm)."""
        expired = []

        def expire() -> None:
            expired.append(True)
            conn.terminate()
        timer = asyncio.get_running_loop().call_later(self.timeout, expire)
        try:
            return await work(conn)
        except Exception as exc:
            if expired:
                raise StoreUnavailable(f"the limits store did not answer within {self.timeout:g}s") from exc
            raise
        finally:
            timer.cancel()

    async def _run(self, work):
        """`await work(conn)` on a connection of the pool (see the class docstring)."""
        try:
            conn = self._idle.get_nowait()
        except asyncio.QueueEmpty:
            try:
                conn = await asyncio.wait_for(self._idle.get(), self.timeout)
            except asyncio.TimeoutError:
                raise NotSent(f"no connection to the limits store was free within {self.timeout:g}s") from None
        loop = asyncio.get_running_loop()
        sent = False
        try:
            if conn is None or conn.is_closed() or loop.time() - self._freed_at.get(conn, 0.0) > MAX_IDLE_SECONDS:
                self._discard(conn)
                conn = None
                conn = await self._connect(self.timeout)
            sent = True
            return await self._bounded(conn, work)
        except BaseException as exc:
            if not sent and isinstance(exc, Exception):
                self._discard(conn)
                conn = None
                raise NotSent(f"the limits store took no connection ({exc})") from exc
            # An error the server answered leaves the connection as it was (asyncpg reads on to the server's
            # ready-for-query, and a transaction block is rolled back): it is used again, so that a server
            # failing every statement (a full disk) is not also made to open a connection for each.  Anything
            # else may leave it on its way out (the server ended it: its notice is read, its end not yet;
            # asyncpg then refuses it with InternalClientError) or in the middle of an exchange (cancelled):
            # the next use, which may come at once, opens a new one.
            if conn is not None and isinstance(exc, _server_errors()) and not conn.is_closed():
                raise
            self._discard(conn)
            conn = None
            if isinstance(exc, _lost_connection_errors()):
                raise ConnectionLost(f"the connection to the limits store was lost ({exc})") from exc
            raise
        finally:
            if conn is not None and conn.is_closed():
                self._discard(conn)
                conn = None
            if conn is not None:
                self._freed_at[conn] = loop.time()
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        await self._admissions.close()
        await self._releases.close()
        conns, self._open = self._open, []
        self._lease_conn = None
        for conn in conns:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:  # noqa: BLE001 - the database went away: nothing to hand back
                conn.terminate()

    async def admit(self, limits: Limits, request_id: str, holder: str, bound_cost: float,
                    bound_tokens: int) -> Decision:
        return await self._admissions.call((limits, request_id, holder, float(bound_cost), int(bound_tokens)))

    async def _admit_many(self, items: list) -> list[Decision]:
        """Decisions on `items` (limits, request id, holder, bound cost, bound tokens) in their order, by
        one call of apertis_admit_many (one item alone: of apertis_admit, which costs the server less).
        A connection lost under the call (the server ended it an instant before) is replaced and the call
        made once more.  Should the lost call have committed, an admission with a slot or a reservation
        meets its own row (its key and request id are the primary key) and the call fails whole, as it
        would have; one of a key with only a requests-per-minute limit counts twice in its minute, which
        errs on the side of the limit."""
        try:
            return await self._decide(items)
        except ConnectionLost:
            return await self._decide(items)

    async def _decide(self, items: list) -> list[Decision]:
        if len(items) == 1:
            (one, request_id, holder, cost, tokens), = items
            rows = await self._run(lambda conn: conn.fetch(
                _ADMIT, one.key_id, request_id, holder, cost, tokens, _float(one.quota_cost), _int(one.quota_tokens),
                one.quota_period, _int(one.rpm), _int(one.concurrency)))
        else:
            limits = [item[0] for item in items]
            rows = await self._run(lambda conn: conn.fetch(
                _ADMIT_MANY, [one.key_id for one in limits], [item[1] for item in items], [item[2] for item in items],
                [item[3] for item in items], [item[4] for item in items], [_float(one.quota_cost) for one in limits],
                [_int(one.quota_tokens) for one in limits], [one.quota_period for one in limits],
                [_int(one.rpm) for one in limits], [_int(one.concurrency) for one in limits],
                sorted({one.key_id for one in limits})))
        return [Decision(row[0], row[1], Use(spent_cost=row[2], spent_tokens=row[3], live=row[4], live_cost=row[5],
                                             live_tokens=row[6], recent=row[7], freeing_at=None), max(1, row[8]))
                for row in rows]

    async def release(self, key_id: int, request_id: str, cost: Optional[float], tokens: Optional[int],
                      settled_by_ledger: bool, period: Optional[str] = None, start: Optional[str] = None,
                      retry: bool = False) -> None:
        """As admissions.release_step; a release that never reached the store fails with ReleaseNotRun (made
        again, it is still a first release)."""
        try:
            await self._release(key_id, request_id, cost, tokens, settled_by_ledger, period, start, retry)
        except NotSent as exc:
            raise ReleaseNotRun(str(exc)) from exc

    async def _release(self, key_id: int, request_id: str, cost: Optional[float], tokens: Optional[int],
                       settled_by_ledger: bool, period: Optional[str], start: Optional[str], retry: bool) -> None:
        if cost is None or tokens is None:
            # The reserved bound stands as the request's cost, or tokens (admissions.release_step).
            async def at_bound(conn) -> None:
                async with conn.transaction():
                    if not settled_by_ledger:
                        await conn.execute(_settling_spend(key_id))
                    row = await conn.fetchrow(_RESERVED, key_id, request_id) or (0.0, 0)
                    ended_cost = row[0] if cost is None else float(cost)
                    ended_tokens = row[1] if tokens is None else int(tokens)
                    if settled_by_ledger:
                        await conn.execute(*_release_one(key_id, request_id, ended_cost, ended_tokens, start or ""))
                    else:
                        await _release_and_settle(conn, key_id, request_id, ended_cost, ended_tokens, period,
                                                  start, retry)
            await self._run(at_bound)
            return
        if settled_by_ledger:
            await self._releases.call((key_id, request_id, float(cost), int(tokens), start or ""))
            return

        async def settle(conn) -> None:
            async with conn.transaction():
                await conn.execute(_settling_spend(key_id))
                await _release_and_settle(conn, key_id, request_id, cost, tokens, period, start, retry)
        await self._run(settle)

    async def _release_many(self, items: list) -> list[None]:
        """Releases settled by the ledger of `items` (key id, request id, cost, tokens, day), by one
        statement (one release alone: the simpler statement of one)."""
        if len(items) == 1:
            args = _release_one(*items[0])
        else:
            args = (_RELEASE_MANY, *(list(column) for column in zip(*items)), sorted({item[0] for item in items}))
        await self._run(lambda conn: conn.execute(*args))
        return [None] * len(items)

    async def renew_lease(self, holder: str, seconds: float) -> Renewal:
        conn = self._lease_conn
        if conn is None or conn.is_closed():
            self._discard(conn)
            self._lease_conn = None
            conn = self._lease_conn = await self._connect(self.timeout)
        try:
            row = await self._bounded(conn, lambda conn: conn.fetchrow(_RENEW, holder, float(seconds)))
        finally:
            if conn.is_closed():
                self._discard(conn)
                self._lease_conn = None
        return Renewal(int(row[1]), row[0])

    async def tidy(self) -> None:
        """Vacuum the admission tables: every request leaves dead rows in them, and a decision reads a key's
        range of `admissions`, so dead rows left for autovacuum (once a minute) would slow every decision."""
        await self._run(lambda conn: conn.execute(f"VACUUM (SKIP_LOCKED) {', '.join(CHURNING_TABLES)}"))

    async def drop_lease(self, holder: str) -> None:
        """The lease and the live admissions go; ended ones wait for their ledger rows (admissions.drop_step).
        The lease first, then the admissions under their keys' settling locks (a ledger write may be settling
        some of them at that moment): the order of a renewal that collects a stale holder's."""
        async def drop(conn) -> None:
            async with conn.transaction():
                await conn.execute("DELETE FROM limit_leases WHERE holder = $1", holder)
                keys = await conn.fetchval("SELECT COALESCE(array_agg(DISTINCT key_id ORDER BY key_id), '{}')"
                                           " FROM admissions WHERE holder = $1 AND live = 1", holder)
                await conn.execute(TAKE_SETTLE_LOCKS, keys)
                await conn.execute("DELETE FROM admissions WHERE holder = $1 AND live = 1", holder)
        await self._run(drop)

    async def in_flight(self, key_id: int) -> tuple[int, float]:
        row = await self._run(lambda conn: conn.fetchrow(
            "SELECT COUNT(*), COALESCE(SUM(a.cost), 0) FROM admissions a JOIN limit_leases l"
            " ON l.holder = a.holder WHERE a.key_id = $1 AND a.live = 1"
            " AND l.expires_at > extract(epoch FROM clock_timestamp())", key_id))
        return int(row[0]), float(row[1])


def _release_one(key_id: int, request_id: str, cost: float, tokens: int, start: str) -> tuple:
    """The statement and arguments of one release settled by the ledger: its reservation becomes its cost
    under `start`, or a request that cost nothing is forgotten."""
    if cost or tokens:
        return _RELEASE_ENDED, key_id, request_id, cost, tokens, start
    return _RELEASE_FREE, key_id, request_id


async def _release_and_settle(conn, key_id: int, request_id: str, cost: float, tokens: int,
                              period: Optional[str], start: Optional[str], retry: bool) -> None:
    """Without a ledger settling spend: the admission goes and its cost is added to the key's spend (as
    admissions.release_step: a retry only while the admission is still there).  In a transaction that began
    with _settling_spend(key_id)."""
    found = await conn.fetchval(_RELEASE_FREE, key_id, request_id)
    if (retry and found is None) or not (cost or tokens):
        return
    if await conn.fetchval("SELECT 1 FROM keys WHERE id = $1", key_id) is None:
        return
    await conn.execute("INSERT INTO key_spend (key_id, cost, tokens) VALUES ($1, $2, $3)"
                       " ON CONFLICT (key_id) DO UPDATE SET cost = key_spend.cost + EXCLUDED.cost,"
                       " tokens = key_spend.tokens + EXCLUDED.tokens", key_id, float(cost), int(tokens))
    if period is not None and start is not None:
        await conn.execute("INSERT INTO key_period_spend (key_id, period, start, cost, tokens)"
                           " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_id, period, start) DO UPDATE"
                           " SET cost = key_period_spend.cost + EXCLUDED.cost,"
                           " tokens = key_period_spend.tokens + EXCLUDED.tokens",
                           key_id, period, start, float(cost), int(tokens))


def _settling_spend(key_id: int) -> str:
    """The first statement of a release that adds its cost to the spend itself (no ledger): the key's settling
    lock, before the admission and the spend rows a ledger write of another host may be upserting; and, the
    spend being money, a commit that waits for its WAL flush, unlike the connection's others (SESSION_SETTINGS).
    One round trip (a simple query: the key id is an integer)."""
    return f"SET LOCAL synchronous_commit = on; SELECT {settle_lock(str(int(key_id)))}"


class ConnectionLost(StoreUnavailable):
    """The connection went away under a statement; the pool opens a new one for the next."""


class NotSent(StoreUnavailable):
    """No connection to send the statement on (none free in time, or none could be opened): nothing of it ran."""


def _server_errors() -> tuple[type[BaseException], ...]:
    """The errors the server reports for a statement it rolled back (nothing of a batch stays)."""
    import asyncpg
    return (asyncpg.PostgresError,)


def _lost_connection_errors() -> tuple[type[BaseException], ...]:
    """A connection that went away under a statement (the server ended it, a broken pipe)."""
    import asyncpg
    return (asyncpg.InternalClientError, asyncpg.ConnectionDoesNotExistError, ConnectionError)


def _float(value) -> Optional[float]:
    return None if value is None else float(value)


def _int(value) -> Optional[int]:
    return None if value is None else int(value)
