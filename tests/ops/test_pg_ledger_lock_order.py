"""The lock order of the ledger's write (pg_ledger.PgLedger.write: _write_sql, then _SETTLE_ENDED) against the
other statements that lock the same rows on PostgreSQL: another host's ledger write, a batched release
(pg_admissions._RELEASE_MANY) of other requests of the same keys, and the deletion of a holder's live
admissions (PgAdmissions.drop_lease, the renewal's `collected` in _RENEW).

Each of these shapes locked rows in an order of its plan's against another statement's order, and deadlocked:

- _SETTLE_ENDED updates admission_ended `FROM unnest(...)`: with more than a few keys the planner hashes the
  unnest rows and probes them with a sequential scan of admission_ended, so the ended sums are locked in the
  table's physical order, not in the ascending (key, day) order of the release batch's upsert (ORDER BY key_id,
  start).
- drop_lease and the renewal delete a holder's live admissions in an order of their plans' (physical, or its
  reverse through a hash join), against the ledger's and a release batch's own order.
- Two hosts' ledger writes upsert usage_daily (and key_spend) from a HashAggregate (GROUP BY): the order of the
  groups depends on the hash table, whose size follows the batch's groups.

The rule that keeps them apart (pg_admissions.SETTLE_LOCK): every statement that settles or deletes admissions
takes its keys' settling locks in ascending order first, and the upserts of the ledger go in the order of their
keys (ORDER BY), for rows of no key.

The deterministic tests line the transactions up with a third connection that holds one row locked (a stand-in
for any transaction that holds it a moment, such as a third host's statement); the product's statements run as
they are.  The others run the product's writes concurrently for a few seconds.  Each test asserts that the
server logged no deadlock and that nothing was lost: a ledger batch or a release refused as a deadlock victim is
sent again, as the spool and the limiter do.
"""
from __future__ import annotations

import asyncio
import random
import re
import time

import asyncpg
import pytest

from apertis_proxy.store import pg_ledger
from apertis_proxy.store.admissions import STALE_LEASE_SECONDS, Limits

from .test_admissions_store import admit, lease, leased_process, new_key, opened
from .test_pg_release_lock_order import (deadlock_lines, ledger_columns, lock_waiters, log_size, server_log,
                                         tuned, usage_row)


async def settled_state(target: str) -> tuple[dict, list, int]:
    """The keys' settled spend {key: (cost, tokens)}, the ended sums not back at zero, the admissions left."""
    conn = await asyncpg.connect(target)
    try:
        spend = {r[0]: (r[1], r[2]) for r in await conn.fetch("SELECT key_id, cost, tokens FROM key_spend")}
        ended = await conn.fetch("SELECT key_id, n, cost, tokens FROM admission_ended WHERE n <> 0 OR cost <> 0")
        return spend, [tuple(r) for r in ended], await conn.fetchval("SELECT COUNT(*) FROM admissions")
    finally:
        await conn.close()


async def row_locker(target: str, sql: str, *args):
    """A connection in a transaction that holds the rows `sql` (a SELECT ... FOR UPDATE) locks."""
    conn = await asyncpg.connect(target)
    await conn.execute("BEGIN")
    assert await conn.fetch(sql, *args), "the row to hold is not there"
    return conn


def deadlocks(pg_server, since: int) -> tuple[int, list[str]]:
    lines = deadlock_lines(server_log(pg_server, since))
    return sum("deadlock detected" in line for line in lines), lines


def deadlock_report(pg_server, since: int) -> str:
    """The deadlocks since `since`: how many per place the victim waited (the CONTEXT line of the server's
    "deadlock detected" error) and per pair of statements (their first words), then the log's first lines
    about them."""
    lines = server_log(pg_server, since).splitlines()
    where: dict[str, int] = {}
    pairs: dict[str, int] = {}
    for i, line in enumerate(lines):
        if "ERROR:  deadlock detected" not in line:
            continue
        end = next((k for k in range(i + 1, min(i + 400, len(lines))) if "CONTEXT:" in lines[k]), i + 1)
        context = lines[end].split("CONTEXT:", 1)[1].strip() if "CONTEXT:" in lines[end] else "?"
        what = re.sub(r"\(\d+,\d+\)", "(.)", context)
        where[what] = where.get(what, 0) + 1
        statements = []
        for k in range(i + 1, end):
            m = re.match(r"\s*Process \d+: ?(.*)$", lines[k])
            if m:
                text = m.group(1) or next((x for x in lines[k + 1:end] if x.strip()), "")
                statements.append(" ".join(text.split()[:4]))
        pair = " / ".join(statements)
        pairs[pair] = pairs.get(pair, 0) + 1
    detail = [line.strip()[:200] for line in lines
              if any(w in line for w in ("deadlock detected", "Process ", "CONTEXT:"))]
    return f"victims {where}; statements {pairs}; " + " | ".join(detail[:8])


# -- 2. _SETTLE_ENDED against a release batch of other requests of the same keys -------------------------------

async def settle_plan(target: str, keys: list[int], day: str) -> str:
    conn = await asyncpg.connect(target)
    try:
        n = len(keys)
        return " / ".join(r[0].strip() for r in await conn.fetch(
            "EXPLAIN " + pg_ledger._SETTLE_ENDED, keys, [day] * n, [1] * n, [0.25] * n, [25] * n))
    finally:
        await conn.close()


@pytest.mark.parametrize("n_keys", [8, 40])
async def test_settle_ended_and_a_release_batch_of_other_requests_lock_the_ended_sums_in_one_order(
        pg_server, pg_url, n_keys):
    """Keys k0 < k1 < ... < kN-1, one day.  A request L_i of each ended (released with its cost, its ledger row
    not in yet), the ended sums' rows created in descending key order (the order the releases came in); R_first
    and R_last (of k0 and kN-1) in flight.  The ledger writes every L_i; one release batch ends R_first and
    R_last: disjoint requests, the same keys' ended sums.  The release batch locks the sums in ascending order
    (k0, then kN-1).  With more than a few keys the planner hashes _SETTLE_ENDED's unnest rows and scans
    admission_ended, locking in the table's physical order (kN-1 first): it would hold kN-1 while it waits for a
    middle key's row (held a moment by another transaction), the batch hold k0 and wait for kN-1, and once the
    middle row is free the ledger reach k0: a deadlock, unless both take the keys' settling locks first."""
    target = await tuned(pg_server, pg_url)
    keys = [new_key(pg_url, f"k{n}") for n in range(n_keys)]
    first, middle, last = keys[0], keys[n_keys // 2], keys[-1]
    started_at = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
    shape = await ledger_columns(target)
    async with leased_process(pg_url) as store:
        for key in reversed(keys):
            assert (await admit(store, Limits(key, quota_cost=100.0), f"L{key}", "h", 1.0, 100)).admitted
        for key in (first, last):
            assert (await admit(store, Limits(key, quota_cost=100.0), f"R{key}", "h", 1.0, 100)).admitted
        for key in reversed(keys):      # one at a time: the sums' rows in descending key order
            await store.admissions.release(key, f"L{key}", 0.25, 25, True, None, day)
        conn = await asyncpg.connect(target)
        try:
            physical = [r[0] for r in await conn.fetch("SELECT key_id FROM admission_ended ORDER BY ctid")]
        finally:
            await conn.close()
        assert physical == list(reversed(keys))
        plan = await settle_plan(target, keys, day)

        since = log_size(pg_server)
        ledger_rows = [usage_row(key, f"L{key}", started_at, 0.25, 25) for key in keys]
        blocker = await row_locker(target, "SELECT 1 FROM admission_ended WHERE key_id = $1 FOR UPDATE", middle)
        raw = await asyncpg.connect(target)
        try:
            ledger = asyncio.create_task(pg_ledger.PgLedger().write(
                raw, shape.columns, [shape.values(r) for r in ledger_rows]))
            waiting1 = await lock_waiters(target, 3.0, 1, [raw.get_server_pid()])
            released = asyncio.gather(store.admissions.release(first, f"R{first}", 0.5, 50, True, None, day),
                                      store.admissions.release(last, f"R{last}", 0.5, 50, True, None, day),
                                      return_exceptions=True)
            waiting2 = await lock_waiters(target, 1.0, 2, [raw.get_server_pid()])
            await blocker.execute("ROLLBACK")
            outcomes = await released
            ledger_outcome, = await asyncio.gather(ledger, return_exceptions=True)
        finally:
            await raw.close()
            await blocker.close()

        # Whatever was refused is sent again (the spool ships a refused batch again; the limiter retries).
        if isinstance(ledger_outcome, BaseException):
            assert await store.store.write_ledger(ledger_rows) == n_keys
        for key, outcome in zip((first, last), outcomes):
            if isinstance(outcome, BaseException):
                await store.admissions.release(key, f"R{key}", 0.5, 50, True, None, day)
        assert await store.store.write_ledger([usage_row(first, f"R{first}", started_at, 0.5, 50),
                                               usage_row(last, f"R{last}", started_at, 0.5, 50)]) == 2
        found, _ = deadlocks(pg_server, since)
        spend, ended, left = await settled_state(target)
        report = (f"_SETTLE_ENDED plan: {plan}; waiting before the batch: {[r['query'][:40] for r in waiting1]}; "
                  f"before the blocker let go: {[r['query'][:40] for r in waiting2]}; release outcomes {outcomes!r};"
                  f" ledger {ledger_outcome!r}; deadlocks {found}; server log: {deadlock_report(pg_server, since)}")
        expected = {key: (pytest.approx(0.75 if key in (first, last) else 0.25), 75 if key in (first, last) else 25)
                    for key in keys}
        assert spend == expected, report
        assert ended == [] and left == 0, report
        assert found == 0, report
        assert not isinstance(ledger_outcome, BaseException) and all(o is None for o in outcomes), report


# -- 3. drop_lease / a renewal's collection against a ledger write of live admissions of the holder ----------

@pytest.mark.parametrize("other", ["ledger", "release"])
@pytest.mark.parametrize("deleter, admitted", [("drop_lease", "cba"), ("renewal", "abc")])
async def test_a_holders_admissions_deleted_and_a_ledger_write_or_release_lock_them_in_one_order(
        pg_server, pg_url, deleter, admitted, other):
    """Holder h has requests in flight on keys a < b < c, and the ledger rows of those on a and c land (before
    their releases, as they may) while h's live admissions are deleted: by h dropping its lease as it shuts down
    (drop_lease), or, h's lease long run out, by another host's renewal (_RENEW's `collected`) while h, restarted,
    ships its spool.  Say the ledger locks its admissions in ascending order (a, c); the deletion takes h's live
    admissions in an order of the plan's: drop_lease in the table's physical order (a bitmap heap scan), the
    renewal in the reverse of it (a hash join whose hashed side is h's admissions: the bucket's chain holds them
    last inserted first).  With the rows admitted in the order that makes that c, b, a, the deletion holds c and
    waits for b (held a moment by another transaction) while the ledger holds a and waits for c; once b is free
    the deletion waits for a: a deadlock.  The same with a release batch of a and c in place of the ledger write
    (other="release").  Unless all of them take the keys' settling locks before any admission."""
    target = await tuned(pg_server, pg_url)
    a, b, c = (new_key(pg_url, f"k{n}") for n in range(3))
    started_at = time.time()
    shape = await ledger_columns(target)
    async with leased_process(pg_url, "h") as store:
        key_of = {"a": a, "b": b, "c": c}
        for name in admitted:
            assert (await admit(store, Limits(key_of[name], quota_cost=100.0), f"r{name}", "h", 1.0, 100)).admitted
        conn = await asyncpg.connect(target)
        try:
            physical = [r[0] for r in await conn.fetch("SELECT key_id FROM admissions ORDER BY ctid")]
        finally:
            await conn.close()
        assert physical == [key_of[name] for name in admitted]
        if deleter == "renewal":        # h's lease ran out long ago: the next renewal of another holder collects
            await store.admissions.renew_lease("h", -(STALE_LEASE_SECONDS + 60))
            delete = store.admissions.renew_lease("other", 30.0)
        else:
            delete = store.admissions.drop_lease("h")

        since = log_size(pg_server)
        ledger_rows = [usage_row(a, "ra", started_at, 0.5, 50), usage_row(c, "rc", started_at, 0.5, 50)]
        blocker = await row_locker(target, "SELECT 1 FROM admissions WHERE key_id = $1 FOR UPDATE", b)
        raw = await asyncpg.connect(target)
        try:
            deleting = asyncio.create_task(delete)
            waiting1 = await lock_waiters(target, 3.0, 1)
            if other == "ledger":
                ledger = asyncio.create_task(pg_ledger.PgLedger().write(
                    raw, shape.columns, [shape.values(r) for r in ledger_rows]))
                waiting2 = await lock_waiters(target, 1.0, 2, [raw.get_server_pid()])
            else:
                day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
                ledger = asyncio.gather(store.admissions.release(a, "ra", 0.5, 50, True, None, day),
                                        store.admissions.release(c, "rc", 0.5, 50, True, None, day))
                waiting2 = await lock_waiters(target, 1.0, 2)
            await blocker.execute("ROLLBACK")
            delete_outcome, ledger_outcome = await asyncio.gather(deleting, ledger, return_exceptions=True)
        finally:
            await raw.close()
            await blocker.close()

        if other == "release":      # the releases refused are made again; then the ledger rows land
            if isinstance(ledger_outcome, BaseException):
                for key, rid in ((a, "ra"), (c, "rc")):
                    await store.admissions.release(key, rid, 0.5, 50, True, None, day, retry=True)
            assert await store.store.write_ledger(ledger_rows) == 2
        elif isinstance(ledger_outcome, BaseException):
            assert await store.store.write_ledger(ledger_rows) == 2
        if isinstance(delete_outcome, BaseException):
            if deleter == "renewal":
                await store.admissions.renew_lease("other", 30.0)
            else:
                await store.admissions.drop_lease("h")
        found, _ = deadlocks(pg_server, since)
        spend, _, left = await settled_state(target)
        report = (f"waiting: {[r['query'][:40] for r in waiting1]} then {[r['query'][:40] for r in waiting2]}; "
                  f"{deleter} {delete_outcome!r}; {other} {ledger_outcome!r}; deadlocks {found}; "
                  f"server log: {deadlock_report(pg_server, since)}")
        assert spend == {a: (pytest.approx(0.5), 50), c: (pytest.approx(0.5), 50)} and left == 0, report
        assert found == 0, report
        assert not isinstance(delete_outcome, BaseException) and not isinstance(ledger_outcome, BaseException), \
            report


# -- 1. two hosts' ledger writes of shared keys and days -------------------------------------------------------

async def ship(store, rows: list[dict], rng: random.Random, refused: list, sizes=(1, 150)) -> None:
    """One host's spool shipping `rows` in batches of random sizes, a batch refused sent again."""
    rows = list(rows)
    rng.shuffle(rows)
    while rows:
        n = rng.randint(*sizes)
        batch, rows = rows[:n], rows[n:]
        while True:
            try:
                await store.store.write_ledger(batch)
                break
            except Exception as exc:  # noqa: BLE001 - a refused batch is shipped again
                refused.append(repr(exc)[:80])
        await asyncio.sleep(rng.uniform(0, 0.002))


async def ended_requests(stores, keys: list[int], days: list[tuple[float, str]], per_host: int,
                         rng: random.Random, round_: int = 0) -> list[list[dict]]:
    """`per_host` requests per host on random keys and days, admitted and released with their costs (their
    ledger rows not in yet: the ended sums hold them), the ended sums' rows created in random order; each
    host's ledger rows."""
    out = []
    for n, store in enumerate(stores):
        rows = []
        for i in range(per_host):
            key = rng.choice(keys)
            at, day = rng.choice(days)
            cost, tokens = round(rng.uniform(0.01, 0.5), 4), rng.randint(1, 90)
            rows.append((key, f"h{n}-{round_}-{i}", at, day, cost, tokens))
        decisions = await asyncio.gather(*(admit(store, Limits(key, quota_cost=1e9), rid, f"h{n}", 1.0, 100)
                                           for key, rid, *_ in rows))
        assert all(d.admitted for d in decisions)
        order = list(rows)
        rng.shuffle(order)
        await asyncio.gather(*(store.admissions.release(key, rid, cost, tokens, True, None, day)
                               for key, rid, at, day, cost, tokens in order))
        out.append([usage_row(key, rid, at, cost, tokens) for key, rid, at, day, cost, tokens in rows])
    return out


async def settled_exactly(target: str, all_rows: list[dict]) -> list[str]:
    """What differs between the store and the ledger rows shipped: key_spend, usage_daily, ended sums, admissions."""
    expected: dict[int, list] = {}
    daily: dict[tuple, list] = {}
    for r in all_rows:
        e = expected.setdefault(r["key_id"], [0.0, 0])
        e[0] += r["cost"]
        e[1] += r["input_tokens"]
        d = daily.setdefault((time.strftime("%Y-%m-%d", time.gmtime(r["started_at"])), r["key_name"]), [0, 0.0, 0])
        d[0] += 1
        d[1] += r["cost"]
        d[2] += r["input_tokens"]
    conn = await asyncpg.connect(target)
    try:
        spend = {r[0]: (r[1], r[2]) for r in await conn.fetch("SELECT key_id, cost, tokens FROM key_spend")}
        rollup = {(str(r[0]), r[1]): (r[2], r[3], r[4]) for r in await conn.fetch(
            "SELECT day, key_name, SUM(requests), SUM(cost), SUM(input_tokens) FROM usage_daily GROUP BY 1, 2")}
        ended = await conn.fetch("SELECT key_id, start, n, cost FROM admission_ended WHERE n <> 0 OR cost <> 0")
        left = await conn.fetchval("SELECT COUNT(*) FROM admissions")
        usage = await conn.fetchval("SELECT COUNT(*) FROM usage")
    finally:
        await conn.close()
    wrong = []
    if usage != len(all_rows):
        wrong.append(f"usage rows {usage} != {len(all_rows)}")
    for key, (cost, tokens) in expected.items():
        got = spend.get(key, (0.0, 0))
        if got[0] != pytest.approx(cost) or got[1] != tokens:
            wrong.append(f"key_spend {key}: {got} != {(cost, tokens)}")
    for k, (n, cost, tokens) in daily.items():
        got = rollup.get(k, (0, 0.0, 0))
        if got[0] != n or got[1] != pytest.approx(cost) or got[2] != tokens:
            wrong.append(f"usage_daily {k}: {got} != {(n, cost, tokens)}")
    if ended:
        wrong.append(f"ended sums left: {[tuple(r) for r in ended][:5]}")
    if left:
        wrong.append(f"admissions left: {left}")
    return wrong


async def ship_rounds(pg_server, target: str, stores: list, seconds: float, rows_of, rng: random.Random,
                      shipped: list[dict], sizes=(1, 150)) -> None:
    """Round after round for `seconds`, both hosts ship at once the rows `await rows_of(round)` gives each
    (batches of `sizes`, a refused one again); then: no deadlock in the server's log, no batch refused, and
    every sum exactly that of the rows shipped (with `shipped` before)."""
    since = log_size(pg_server)
    refused: list[str] = []
    t0 = time.monotonic()
    rounds = 0
    while time.monotonic() - t0 < seconds:
        rows = await rows_of(rounds)
        await asyncio.gather(*(ship(store, host_rows, random.Random(rng.random()), refused, sizes)
                               for store, host_rows in zip(stores, rows)))
        shipped += rows[0] + rows[1]
        rounds += 1
    found, _ = deadlocks(pg_server, since)
    wrong = await settled_exactly(target, shipped)
    report = (f"{rounds} rounds; refused batches {len(refused)} {refused[:3]}; deadlocks {found}; "
              f"wrong {wrong[:5]}; server log: {deadlock_report(pg_server, since)}")
    assert not wrong, report
    assert found == 0 and not refused, report


async def test_two_hosts_ledger_writes_of_ended_requests_of_shared_keys_never_deadlock(pg_server, pg_url):
    """Two gateway hosts (each its own store and connections) ship their spools at once: ledger rows of their
    own requests on the same keys and days (ended: released with their costs beforehand, so that every write
    also settles the ended sums), in batches of random sizes and random order, round after round (for about
    2.5 s).  The writes upsert the same key_spend, usage_daily and admission_ended rows: they must lock them in
    one order.  Afterwards no deadlock in the server's log, and every sum exactly the rows' (a refused batch
    shipped again).  (Two ledger writes of a key take its key_spend and usage_daily rows before its ended sums,
    so _SETTLE_ENDED of one waits for the other's commit; with 60 keys and 3 days the batches' usage_daily groups
    outgrow the HashAggregate's first table and its order differs from batch to batch.)"""
    target = await tuned(pg_server, pg_url)
    keys = [new_key(pg_url, f"key{n:03d}") for n in range(60)]
    rng = random.Random()
    now = time.time()
    days = [(now - d * 86400, time.strftime("%Y-%m-%d", time.gmtime(now - d * 86400))) for d in range(3)]
    stores = await opened(pg_url, 2)
    shipped: list[dict] = []
    try:
        for n, store in enumerate(stores):
            await lease(store, f"h{n}")

        async def rows_of(round_: int) -> list[list[dict]]:
            return await ended_requests(stores, keys, days, 300, rng, round_)
        await ship_rounds(pg_server, target, stores, 2.5, rows_of, rng, shipped)
    finally:
        for store in stores:
            await store.close()


def unlimited_rows(keys: list[int], host: int, round_: int, n: int, days: list[float],
                   rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        row = usage_row(rng.choice(keys), f"h{host}-{round_}-{i}", rng.choice(days),
                        round(rng.uniform(0.01, 0.5), 4), rng.randint(1, 90))
        row["requested_model"] = rng.choice(("m-a", "m-b", "m-c"))
        row["channel_name"] = rng.choice(("ch1", "ch2"))
        out.append(row)
    return out


@pytest.mark.parametrize("rollup_rows", ["new", "existing"])
async def test_two_hosts_ledger_writes_of_unlimited_keys_never_deadlock(pg_server, pg_url, rollup_rows):
    """As above for keys without limits (no admissions: the write upserts key_spend and usage_daily only), rows
    of several days, models and channels: the batches' groups are many, and their number varies with the batch.
    Two hosts ship 2000 rows each at once, in random batches of 1 to 400, round after round (for about 2 s);
    the days' rollup rows are new in each round ("new": the first rows of a day, as every midnight) or all there
    beforehand ("existing").  No deadlock, sums exact."""
    target = await tuned(pg_server, pg_url)
    keys = [new_key(pg_url, f"key{n:03d}") for n in range(40)]
    rng = random.Random()
    now = time.time()
    stores = await opened(pg_url, 2)
    shipped: list[dict] = []
    try:
        if rollup_rows == "existing":
            days = [now - d * 86400 for d in range(4)]
            warm = [usage_row(k, f"w-{k}-{d}-{m}-{c}", t, 0.01, 1) | {"requested_model": m, "channel_name": c}
                    for k in keys for d, t in enumerate(days) for m in ("m-a", "m-b", "m-c") for c in ("ch1", "ch2")]
            assert await stores[0].store.write_ledger(warm) == len(warm)
            shipped += warm

        async def rows_of(round_: int) -> list[list[dict]]:
            in_days = [now - (4 * round_ + d) * 86400 for d in range(4)] if rollup_rows == "new" else days
            return [unlimited_rows(keys, host, round_, 2000, in_days, rng) for host in range(2)]
        await ship_rounds(pg_server, target, stores, 2.0, rows_of, rng, shipped, (1, 400))
    finally:
        for store in stores:
            await store.close()


# -- 2, under load: ledger writes against release batches of other requests of the same keys ------------------

@pytest.mark.parametrize("n_keys", [3, 30])
async def test_ledger_writes_and_release_batches_of_other_requests_of_shared_keys_never_deadlock(
        pg_server, pg_url, n_keys):
    """One host admits and releases waves of requests on random keys (its releases go out in batches:
    _RELEASE_MANY), while the other host's spool ships the ledger rows of the requests released before, in
    batches of random sizes: never a request of a release batch out, always the same keys' ended sums (one day).
    For about 2.5 s; afterwards no deadlock in the server's log and every sum exact.  With 3 keys the ledger's
    _SETTLE_ENDED runs as a nested loop over its (ascending) unnest rows; with 30 it hashes them and scans
    admission_ended, locking the sums in the table's physical order."""
    target = await tuned(pg_server, pg_url)
    keys = [new_key(pg_url, f"key{n:03d}") for n in range(n_keys)]
    rng = random.Random()
    started_at = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(started_at))
    stores = await opened(pg_url, 2)
    pending: list[dict] = []
    shipped: list[dict] = []
    refused: list[str] = []
    release_errors: list[str] = []
    try:
        for n, store in enumerate(stores):
            await lease(store, f"h{n}")
        since = log_size(pg_server)

        async def release(key: int, rid: str, cost: float, tokens: int) -> None:
            await asyncio.sleep(rng.uniform(0, 0.003))
            try:
                await stores[0].admissions.release(key, rid, cost, tokens, True, None, day)
            except Exception as exc:  # noqa: BLE001 - a release refused is made again, as the limiter does
                release_errors.append(repr(exc)[:80])
                await stores[0].admissions.release(key, rid, cost, tokens, True, None, day, retry=True)
            pending.append(usage_row(key, rid, started_at, cost, tokens))

        async def shipper(stop: asyncio.Event) -> None:
            while not (stop.is_set() and not pending):
                rng.shuffle(pending)
                n = rng.randint(1, 120)
                batch, pending[:] = pending[:n], pending[n:]
                if batch:
                    try:
                        await stores[1].store.write_ledger(batch)
                        shipped.extend(batch)
                    except Exception as exc:  # noqa: BLE001 - a refused batch is shipped again
                        refused.append(repr(exc)[:80])
                        pending.extend(batch)
                await asyncio.sleep(rng.uniform(0, 0.002))

        stop = asyncio.Event()
        ship = asyncio.create_task(shipper(stop))
        t0 = time.monotonic()
        wave = 0
        while time.monotonic() - t0 < 2.5:
            requests = [(rng.choice(keys), f"w{wave}-{i}") for i in range(80)]
            decisions = await asyncio.gather(*(admit(stores[0], Limits(key, quota_cost=1e9), rid, "h0", 1.0, 100)
                                               for key, rid in requests))
            assert all(d.admitted for d in decisions)
            await asyncio.gather(*(release(key, rid, round(rng.uniform(0.01, 0.5), 4), rng.randint(1, 90))
                                   for key, rid in requests))
            wave += 1
        stop.set()
        await ship
        found, _ = deadlocks(pg_server, since)
        wrong = await settled_exactly(target, shipped)
        report = (f"{wave} waves; refused ledger batches {len(refused)} {refused[:2]}; releases refused "
                  f"{len(release_errors)} {release_errors[:2]}; deadlocks {found}; wrong {wrong[:5]}; "
                  f"server log: {deadlock_report(pg_server, since)}")
        assert not wrong, report
        assert found == 0 and not refused and not release_errors, report
    finally:
        for store in stores:
            await store.close()
