"""Ended admissions kept under the UTC day their requests started (schema version 10): their exact costs,
not yet in the ledger, count in every decision of a period that holds that day, also after the key's quota
period changed and after an upgrade from the version before."""
from __future__ import annotations

import time

import pytest

from apertis_proxy.budgets.periods import period_start
from apertis_proxy.store import schema, service
from apertis_proxy.store.admissions import Limits, admit_step
from tests.ops.test_admissions_ended import ledger_row, set_period, store_url  # noqa: F401 (a fixture)
from tests.ops.test_admissions_store import admit, leased_process, new_key, release


async def test_a_key_made_lifetime_still_counts_an_ended_cost_the_ledger_refused(store_url):  # noqa: F811
    """A monthly key's request ends, the key's quota becomes a lifetime one, and the ledger refuses the
    request's row: a lifetime decision still counts the ended cost."""
    key_id, other = new_key(store_url, "switched"), new_key(store_url, "other")
    set_period(store_url, key_id, "month")
    now = time.time()
    async with leased_process(store_url) as process:
        monthly = Limits(key_id, quota_cost=1.0, quota_period="month")
        assert (await admit(process, monthly, "lost", "h", cost=0.4)).admitted
        await release(process, key_id, "lost", 0.25, 100, True, "month", period_start("month", now))
        set_period(store_url, key_id, None)
        bad = ledger_row(key_id, "lost", now, 0.25)
        bad["output_tokens"] = 2 ** 70          # past any integer column: the ledger refuses the row
        rejected: list[str] = []
        good = ledger_row(other, "good", now, 0.5, name="other")   # a batch wholly refused is retried later
        assert await process.store.write_ledger([bad, good], rejected) == 1 and rejected == ["lost"]
        lifetime = Limits(key_id, quota_cost=1.0)
        seen = await admit(process, lifetime, "seen", "h", cost=0.1)
        assert seen.use.spent_cost == pytest.approx(0.25)


async def test_a_key_made_weekly_counts_this_weeks_ended_cost_before_its_ledger_row(store_url):  # noqa: F811
    """A request of a monthly key started this week and ended; the key's quota period becomes `week` before the
    ledger row lands: the weekly decision counts the cost from the moment the request ended, as it does once the
    ledger puts it in this week's spend."""
    key_id = new_key(store_url, "reperiod")
    set_period(store_url, key_id, "month")
    now = time.time()
    if period_start("week", now) == period_start("month", now):
        pytest.skip("the week and the month start on the same day: the sums' keys coincide")
    async with leased_process(store_url) as process:
        monthly = Limits(key_id, quota_cost=1.0, quota_period="month")
        assert (await admit(process, monthly, "pending", "h", cost=0.4)).admitted
        await release(process, key_id, "pending", 0.25, 100, True, "month", period_start("day", now))
        set_period(store_url, key_id, "week")
        weekly = Limits(key_id, quota_cost=1.0, quota_period="week")
        before = await admit(process, weekly, "before", "h", cost=0.1)
        await release(process, key_id, "before", 0.0, 0, True, "week", period_start("day", now))
        assert await process.store.write_ledger([ledger_row(key_id, "pending", now, 0.25)]) == 1
        after = await admit(process, weekly, "after", "h", cost=0.1)
        assert after.use.spent_cost == pytest.approx(0.25)       # the ledger row landed: this week's spend
        assert before.use.spent_cost == pytest.approx(0.25)      # fails: 0.0 while the row was on its way


def _as_version_9_with_an_ended_admission(path: str, key_id: int) -> None:
    """A version-9 store (ended sums per key alone, admissions without `start`) holding one ended admission of
    a monthly key, admitted a minute ago, whose ledger row has not landed yet."""
    conn = schema.connect(path)
    conn.isolation_level = None
    conn.execute("UPDATE keys SET quota_period = 'month' WHERE id = ?", (key_id,))
    conn.execute("INSERT INTO limit_leases (holder, expires_at) VALUES ('h', ?)", (time.time() + 60,))
    conn.execute("INSERT INTO admissions (key_id, request_id, holder, admitted_at, live, cost, tokens)"
                 " VALUES (?, 'ended', 'h', ?, 0, 0.25, 100)", (key_id, time.time() - 60))
    conn.execute("DROP TABLE admission_ended")
    conn.execute(schema.ADMISSIONS_V8[0])       # version 9's ended sums: per key alone
    conn.execute("ALTER TABLE admissions DROP COLUMN start")
    conn.execute("INSERT INTO admission_ended (key_id, n, cost, tokens) VALUES (?, 1, 0.25, 100)", (key_id,))
    conn.execute("UPDATE meta SET v = '9' WHERE k = 'schema_version'")
    conn.close()


def test_a_migrated_store_counts_a_monthly_keys_ended_cost_in_its_month(tmp_path):
    """A monthly key's ended request, not yet in the ledger, keeps counting in its month after the upgrade from
    version 9: the migration keeps each ended admission under the day it was admitted."""
    path = str(tmp_path / "v9.db")
    key_id = new_key(path, "monthly")
    _as_version_9_with_an_ended_admission(path, key_id)
    conn = schema.connect(path)
    conn.isolation_level = None
    try:
        assert schema.schema_version(conn) == 10
        monthly = Limits(key_id, quota_cost=1.0, quota_period="month")
        decision = admit_step(conn.cursor(), monthly, "next", "h", 0.1, 0)
        assert decision.use.spent_cost == pytest.approx(0.25)
    finally:
        conn.close()


def _as_pg_version_8_with_an_ended_admission(url: str, key_id: int) -> None:
    """A PostgreSQL store as version 8 left it (ended sums per key alone, admissions without `start`) holding
    one ended admission of a monthly key, admitted a minute ago, whose ledger row has not landed yet."""
    conn = service.connect(url)
    try:
        conn.execute("INSERT INTO limit_leases (holder, expires_at) VALUES ('h', ?)", (time.time() + 60,))
        conn.execute("INSERT INTO admissions (key_id, request_id, holder, admitted_at, live, cost, tokens)"
                     " VALUES (?, 'ended', 'h', ?, 0, 0.25, 100)", (key_id, time.time() - 60))
        conn.execute("ALTER TABLE admissions DROP COLUMN start")
        conn.execute("DROP TABLE admission_ended")
        conn.execute("CREATE TABLE admission_ended (key_id BIGINT PRIMARY KEY, n BIGINT NOT NULL,"
                     " cost DOUBLE PRECISION NOT NULL, tokens BIGINT NOT NULL)")
        conn.execute("INSERT INTO admission_ended (key_id, n, cost, tokens) VALUES (?, 1, 0.25, 100)", (key_id,))
        conn.execute("UPDATE meta SET v = '8' WHERE k = 'schema_version'")
        conn.commit()
    finally:
        conn.close()


async def test_a_migrated_postgresql_store_counts_a_monthly_keys_ended_cost_in_its_month(pg_url):
    """The same on PostgreSQL, upgraded from its version 8."""
    key_id = new_key(pg_url, "monthly")
    set_period(pg_url, key_id, "month")
    _as_pg_version_8_with_an_ended_admission(pg_url, key_id)
    async with leased_process(pg_url) as process:
        monthly = Limits(key_id, quota_cost=1.0, quota_period="month")
        decision = await admit(process, monthly, "next", "h", cost=0.1)
        assert decision.use.spent_cost == pytest.approx(0.25)
