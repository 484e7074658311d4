"""store/channel_health.py on a real SQLite file: each worker's rows written as the router writes them, merged for
`channels list` as the CLI reads them."""
from __future__ import annotations

import time

import aiosqlite

from apertis_proxy.store import schema
from apertis_proxy.store.channel_health import (WINDOW_SECONDS, HealthRow, channel_state, end_cooldowns,
                                                read_health, write_rows)


async def write(path: str, worker: str, rows: list[HealthRow]) -> None:
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await write_rows(conn, worker, rows)


async def test_two_workers_merge_into_one_view(tmp_path):
    path = str(tmp_path / "gateway.db")
    conn = schema.connect(path)
    now = time.time()
    a = HealthRow(1, "main", cool_until=now + 30, cool_cause="overloaded", last_error="529 overloaded_error: busy",
                  last_error_at=now - 5, last_request_id="req_a")
    a.count_failure("overloaded", now - 5)
    a.count_failure("overloaded", now - WINDOW_SECONDS - 120)     # outside the window: dropped on write
    b = HealthRow(1, "main", cool_until=now + 90, cool_cause="rate_limited", last_error="429 rate_limit_error: slow",
                  last_error_at=now - 1, last_request_id="req_b")
    b.count_failure("rate_limited", now - 1)
    b.count_failure("overloaded", now - 2)
    await write(path, "host/0", [a])
    await write(path, "host/1", [b])

    merged = read_health(conn, now)[1]
    assert merged["workers"] == 2 and merged["cooling_workers"] == 2
    assert (merged["cooling_until"], merged["cooling_cause"]) == (now + 90, "rate_limited")   # the latest end
    assert merged["failures"] == {"overloaded": 2, "rate_limited": 1}
    assert (merged["last_error"], merged["last_request_id"]) == ("429 rate_limit_error: slow", "req_b")

    state = channel_state({"enabled": True}, merged)
    assert state["state"] == "cooling" and state["cooling_workers"] == 2
    assert channel_state({"enabled": False}, merged)["state"] == "disabled"
    assert channel_state({"enabled": True}, None)["state"] == "serving"

    # Worker 1 restarts: its cooldown is gone, its counts and last error stay; worker 0 still rests the channel.
    async with aiosqlite.connect(path, isolation_level=None) as aconn:
        await end_cooldowns(aconn, "host/1")
    merged = read_health(conn, now)[1]
    assert (merged["cooling_until"], merged["cooling_workers"]) == (now + 30, 1)
    assert merged["failures"] == {"overloaded": 2, "rate_limited": 1}
    # Past every cooldown: serving again, the failures still shown.
    later = read_health(conn, now + 60)[1]
    assert channel_state({"enabled": True}, later)["state"] == "serving"
    assert later["failures"] == {"overloaded": 2, "rate_limited": 1}
    conn.close()
