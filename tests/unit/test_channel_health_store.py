"""store/channel_health.py on a real SQLite file and a real PostgreSQL database: each worker's rows written as the
router writes them (through its own connection), merged for `channels list` as the CLI reads them."""
from __future__ import annotations

import time

import pytest

from apertis_proxy.store import service
from apertis_proxy.store.channel_health import (WINDOW_SECONDS, HealthRow, channel_state, end_cooldowns,
                                                read_health, write_rows)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "gateway.db")
    return request.getfixturevalue("pg_url")


def write(url: str, worker: str, rows: list[HealthRow]) -> None:
    conn = service.connect(url)
    try:
        write_rows(conn, worker, rows)
    finally:
        conn.close()


def test_two_workers_merge_into_one_view(store_url):
    path = store_url
    conn = service.connect(path)
    now = time.time()
    a = HealthRow(1, "main", cool_until=now + 30, cool_cause="overloaded", last_error="529 overloaded_error: busy",
                  last_error_at=now - 5, last_request_id="req_a")
    a.count_failure("overloaded", now - 5)
    a.count_failure("overloaded", now - WINDOW_SECONDS - 120)     # outside the window: dropped on write
    b = HealthRow(1, "main", cool_until=now + 90, cool_cause="rate_limited", last_error="429 rate_limit_error: slow",
                  last_error_at=now - 1, last_request_id="req_b")
    b.count_failure("rate_limited", now - 1)
    b.count_failure("overloaded", now - 2)
    write(path, "host/0", [a])
    write(path, "host/1", [b])

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
    other = service.connect(path)
    end_cooldowns(other, "host/1")
    other.close()
    merged = read_health(conn, now)[1]
    assert (merged["cooling_until"], merged["cooling_workers"]) == (now + 30, 1)
    assert merged["failures"] == {"overloaded": 2, "rate_limited": 1}
    # Past every cooldown: serving again, the failures still shown.
    later = read_health(conn, now + 60)[1]
    assert channel_state({"enabled": True}, later)["state"] == "serving"
    assert later["failures"] == {"overloaded": 2, "rate_limited": 1}
    conn.close()
