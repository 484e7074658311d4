"""The SQLite admission tables of an existing store are brought to this version's schema in place, with the
admissions they hold still counted."""
from __future__ import annotations

import sqlite3
import time

from apertis_proxy.store import schema
from apertis_proxy.store.admissions import Limits, admit_step, in_flight, release_step, renew_step


def _as_version_8(path: str) -> None:
    """A store as version 8 left it: the live admissions indexed by key alone, one in flight and one ended (its
    sum kept per key alone); the minute's times unnumbered beside a count per key, key 7 with three (one of them
    older than the minute)."""
    conn = schema.connect(path)
    conn.isolation_level = None
    conn.execute("DROP INDEX admissions_live")
    conn.execute("CREATE INDEX admissions_live ON admissions (key_id) WHERE live = 1")
    conn.execute("DROP TABLE admission_times")
    for ddl in schema.ADMISSIONS_DDL:
        conn.execute(ddl)       # the version-7 tables: admission_times and admission_counts again
    now = time.time()
    conn.execute("INSERT INTO admission_times (key_id, at, request_id) VALUES (7, ?, 't1'), (7, ?, 't2'),"
                 " (7, ?, 't0'), (8, ?, 'u0')", (now - 20, now - 10, now - 70, now - 5))
    conn.execute("INSERT INTO admission_counts (key_id, n, last_at) VALUES (7, 3, ?), (8, 1, ?)", (now - 10, now - 5))
    conn.execute("INSERT INTO limit_leases (holder, expires_at) VALUES ('h', ?)", (time.time() + 60,))
    conn.execute("INSERT INTO admissions (key_id, request_id, holder, admitted_at, live, cost, tokens)"
                 " VALUES (7, 'live', 'h', ?, 1, 0.5, 0), (7, 'ended', 'h', ?, 0, 0.25, 0)",
                 (time.time(), time.time()))
    conn.execute("DROP TABLE admission_ended")
    conn.execute(schema.ADMISSIONS_V8[0])     # version 8's ended sums: per key alone
    conn.execute("ALTER TABLE admissions DROP COLUMN start")
    conn.execute("INSERT INTO admission_ended (key_id, n, cost, tokens) VALUES (7, 1, 0.25, 0)")
    conn.execute("UPDATE meta SET v = '8' WHERE k = 'schema_version'")
    conn.close()


def _migrated(tmp_path) -> sqlite3.Connection:
    """A version-8 store opened by this version (migrated), in autocommit."""
    path = str(tmp_path / "v8.db")
    _as_version_8(path)
    conn = schema.connect(path)
    conn.isolation_level = None
    return conn


def test_a_version_8_store_indexes_live_admissions_with_what_a_decision_reads(tmp_path):
    conn = _migrated(tmp_path)
    try:
        assert schema.schema_version(conn) == schema.SCHEMA_VERSION == 10
        columns = [r[2] for r in conn.execute("PRAGMA index_info(admissions_live)")]
        assert columns == ["key_id", "holder", "cost", "tokens", "live"]
        assert in_flight(conn, 7) == (1, 0.5)
        limits = Limits(7, quota_cost=1.0, concurrency=2)
        # 0.25 ended and 0.5 in flight: a bound of 0.3 does not fit, one of 0.2 does.
        refused = admit_step(conn.cursor(), limits, "big", "h", 0.3, 0)
        assert refused.reason == "quota_reserved"
        assert (refused.use.live, refused.use.live_cost, refused.use.spent_cost) == (1, 0.5, 0.25)
        assert admit_step(conn.cursor(), limits, "small", "h", 0.2, 0).admitted
        assert admit_step(conn.cursor(), limits, "third", "h", 0.0, 0).reason == "concurrency"
        release_step(conn.cursor(), 7, "live", 0.1, 0, True)
        assert in_flight(conn, 7) == (1, 0.2)
        plan = " ".join(r[3] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT COUNT(*), SUM(cost) FROM admissions INDEXED BY admissions_live"
            " WHERE key_id = 7 AND live = 1 GROUP BY holder"))
        assert "COVERING INDEX admissions_live" in plan
    finally:
        conn.close()


def test_a_fresh_store_and_a_migrated_one_have_the_same_admission_tables(tmp_path):
    fresh, old = str(tmp_path / "fresh.db"), str(tmp_path / "old.db")
    schema.connect(fresh).close()
    _as_version_8(old)
    tables = {}
    for path in (fresh, old):
        conn = schema.connect(path)
        tables[path] = sorted(tuple(r) for r in conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'admission%' OR name LIKE 'limit%'"))
        conn.close()
    assert tables[fresh] == tables[old]


def test_a_version_8_store_numbers_the_minute_it_holds(tmp_path):
    conn = _migrated(tmp_path)
    try:
        rows = conn.execute("SELECT key_id, seq, request_id FROM admission_times ORDER BY key_id, at").fetchall()
        assert [tuple(r) for r in rows] == [(7, 1, "t0"), (7, 2, "t1"), (7, 3, "t2"), (8, 1, "u0")]
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'admission_counts'").fetchone() is None
        limits = Limits(7, rpm=3)
        # Two of the key's three times are in the minute: one more is admitted, numbered after them.
        assert admit_step(conn.cursor(), limits, "t3", "h", 0.0, 0).admitted
        refused = admit_step(conn.cursor(), limits, "t4", "h", 0.0, 0)
        assert refused.reason == "rpm" and refused.use.recent == 3
        assert 39 <= refused.retry_after <= 41           # t1, 20 s ago, leaves the minute in 40 s
        assert conn.execute("SELECT MAX(seq) FROM admission_times WHERE key_id = 7").fetchone()[0] == 4
        # A renewal deletes what left the minute (t0), whichever key it belongs to.
        renew_step(conn.cursor(), "h", 30)
        left = [r[0] for r in conn.execute("SELECT request_id FROM admission_times ORDER BY key_id, at")]
        assert left == ["t1", "t2", "t3", "u0"]
        assert admit_step(conn.cursor(), Limits(8, rpm=2), "u1", "h", 0.0, 0).admitted
        assert admit_step(conn.cursor(), Limits(8, rpm=2), "u2", "h", 0.0, 0).reason == "rpm"
    finally:
        conn.close()


class _Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_clock_set_back_holds_the_minute_for_a_minute_not_for_the_step(tmp_path, monkeypatch):
    """An admission, then the wall clock stepped back an hour (an NTP step, a restored VM): the key's time ahead
    of the clock comes back to it, so the admissions after the step fill the minute as they come, and two quiet
    minutes later the key is admitted again (its times stamped an hour ahead would have held it to five an
    hour)."""
    from apertis_proxy.store import admissions
    conn = schema.connect(str(tmp_path / "s.db"))
    conn.isolation_level = None
    clock = _Clock(time.time())
    monkeypatch.setattr(admissions.time, "time", clock)
    limits = Limits(7, rpm=5)
    renew_step(conn.cursor(), "h", 30)
    assert admit_step(conn.cursor(), limits, "a0", "h", 0.0, 0).admitted
    clock.t -= 3600
    for n in range(1, 5):
        clock.t += 10
        assert admit_step(conn.cursor(), limits, f"a{n}", "h", 0.0, 0).admitted
    refused = admit_step(conn.cursor(), limits, "a5", "h", 0.0, 0)     # five in this minute: a0 counts in it
    assert (refused.reason, refused.use.recent) == ("rpm", 5)
    assert 29 <= refused.retry_after <= 31          # a0 came back to the time of a1, 30 s ago
    times = [at for at, in conn.execute("SELECT at FROM admission_times WHERE key_id = 7 ORDER BY seq")]
    assert times == sorted(times) and max(times) <= clock.t
    clock.t += 120
    renew_step(conn.cursor(), "h", 30)
    assert admit_step(conn.cursor(), limits, "late", "h", 0.0, 0).admitted
