"""Channel health as each worker's router sees it (table ``channel_health``).

The router keeps cooldowns in memory; it writes one compact row per channel
and worker when that channel's state changes, so the CLI, another process, can
show which channels serve, which cool down (until when, why) and what failed
recently.  Failures are counted per kind in one-minute buckets, so a reader
can sum any recent window and a row stays small.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

# Failure buckets older than this are dropped when a row is written.
WINDOW_SECONDS = 3600


@dataclass(slots=True)
class HealthRow:
    """One worker's view of one channel."""

    channel_id: int
    channel_name: str
    cool_until: Optional[float] = None      # unix time
    cool_cause: Optional[str] = None
    failures: dict[str, dict[int, int]] = field(default_factory=dict)   # kind -> {unix minute: n}
    last_error: Optional[str] = None
    last_error_at: Optional[float] = None
    last_request_id: Optional[str] = None

    def count_failure(self, kind: str, at: float) -> None:
        buckets = self.failures.setdefault(kind, {})
        minute = int(at // 60)
        buckets[minute] = buckets.get(minute, 0) + 1

    def prune(self, now: float) -> None:
        oldest = int((now - WINDOW_SECONDS) // 60)
        for kind in list(self.failures):
            buckets = {m: n for m, n in self.failures[kind].items() if m > oldest}
            if buckets:
                self.failures[kind] = buckets
            else:
                del self.failures[kind]


_UPSERT = """
INSERT INTO channel_health (channel_id, worker, channel_name, cool_until, cool_cause, failures,
                            last_error, last_error_at, last_request_id, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (channel_id, worker) DO UPDATE SET
    channel_name = excluded.channel_name, cool_until = excluded.cool_until,
    cool_cause = excluded.cool_cause, failures = excluded.failures,
    last_error = excluded.last_error, last_error_at = excluded.last_error_at,
    last_request_id = excluded.last_request_id, updated_at = excluded.updated_at
"""


def write_rows(conn, worker: str, rows: Iterable[HealthRow]) -> None:
    """Store this worker's rows (a store connection, on the store's thread)."""
    now = time.time()
    params = []
    for row in rows:
        row.prune(now)
        params.append((row.channel_id, worker, row.channel_name, row.cool_until, row.cool_cause,
                       json.dumps(row.failures), row.last_error, row.last_error_at,
                       row.last_request_id, now))
    if params:
        with conn:
            conn.executemany(_UPSERT, params)


def end_cooldowns(conn, worker: str) -> None:
    """A worker starting has no cooldowns yet: its earlier rows keep their
    failure counts and last error, not a cooldown it no longer enforces."""
    conn.execute("UPDATE channel_health SET cool_until = NULL, cool_cause = NULL"
                       " WHERE worker = ? AND cool_until IS NOT NULL", (worker,))


def read_health(conn, now: Optional[float] = None) -> dict[int, dict[str, Any]]:
    """Every channel's health merged over the workers (a store connection):
    channel id -> {"cooling_until", "cooling_cause", "cooling_workers", "workers",
    "failures" (kind -> count in the last WINDOW_SECONDS), "last_error",
    "last_error_at", "last_request_id"}.  A channel cools down while any worker
    rests it; the latest end is reported."""
    now = time.time() if now is None else now
    oldest = int((now - WINDOW_SECONDS) // 60)
    merged: dict[int, dict[str, Any]] = {}
    for row in conn.execute("SELECT * FROM channel_health ORDER BY channel_id, worker"):
        health = merged.setdefault(row["channel_id"], {
            "cooling_until": None, "cooling_cause": None, "cooling_workers": 0, "workers": 0,
            "failures": {}, "last_error": None, "last_error_at": None, "last_request_id": None})
        health["workers"] += 1
        until = row["cool_until"]
        if until is not None and until > now:
            health["cooling_workers"] += 1
            if health["cooling_until"] is None or until > health["cooling_until"]:
                health["cooling_until"], health["cooling_cause"] = until, row["cool_cause"]
        for kind, buckets in json.loads(row["failures"] or "{}").items():
            count = sum(n for minute, n in buckets.items() if int(minute) > oldest)
            if count:
                health["failures"][kind] = health["failures"].get(kind, 0) + count
        at = row["last_error_at"]
        if at is not None and (health["last_error_at"] is None or at > health["last_error_at"]):
            health["last_error"], health["last_error_at"] = row["last_error"], at
            health["last_request_id"] = row["last_request_id"]
    return merged


def channel_state(channel: dict[str, Any], health: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What `channels list` shows of a channel's live state, from its row (a
    list_channels() dict) and its merged health (read_health())."""
    health = health or {}
    if not channel["enabled"]:
        state = "disabled"
    elif health.get("cooling_until") is not None:
        state = "cooling"
    else:
        state = "serving"
    return {
        "state": state,
        "cooling_until": health.get("cooling_until") if state == "cooling" else None,
        "cooling_cause": health.get("cooling_cause") if state == "cooling" else None,
        "cooling_workers": health.get("cooling_workers", 0) if state == "cooling" else 0,
        "workers_reporting": health.get("workers", 0),
        "recent_failures": health.get("failures", {}),
        "last_error": health.get("last_error"),
        "last_error_at": health.get("last_error_at"),
        "last_error_request_id": health.get("last_request_id"),
    }
