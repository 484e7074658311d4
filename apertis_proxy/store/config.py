"""The configuration snapshot: keys, rotated-out secrets, channels and the
catalogue, read in one go and never changed afterwards.

One ChangeWatcher per worker (changes.py) publishes a new snapshot whenever the
stored configuration changed; the core and every plugin read the same object.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from ..plugin_api import Channel
from .catalog import Catalog, load_catalog
from .channels import CHANNEL_COLUMNS, row_to_channel
from .key_encryption import SecretKeyError

log = logging.getLogger("apertis_proxy.store.config")


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One gateway key as configured (its hash, never the key)."""
    id: int
    name: str
    key_hash: str
    enabled: bool
    expires_at: Optional[float]
    models: Optional[tuple[str, ...]]
    quota_cost: Optional[float]
    quota_tokens: Optional[int]
    quota_period: Optional[str]          # day, week, month (UTC); None = lifetime
    rpm: Optional[int]
    concurrency: Optional[int]


@dataclass(frozen=True, slots=True)
class GraceSecret:
    """A rotated-out secret, still accepted until `until` (unix time)."""
    key_hash: str
    key_id: int
    until: float


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    rev: int = -1
    keys: tuple[KeyConfig, ...] = ()
    grace: tuple[GraceSecret, ...] = ()
    channels: tuple[Channel, ...] = ()           # enabled channels whose key this process can open
    disabled_channels: tuple[Channel, ...] = ()  # the disabled ones (an outage, told apart from an unknown model)
    catalog: Catalog = field(default_factory=Catalog)
    read_at: float = 0.0                         # time.monotonic() when the read began


def read_rev(conn) -> int:
    row = conn.execute("SELECT rev FROM config_rev WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def read_config(conn) -> ConfigSnapshot:
    """Read the whole configuration in one transaction (a consistent view)."""
    read_at = time.monotonic()
    conn.execute("BEGIN")
    try:
        rev = read_rev(conn)
        catalog = load_catalog(conn)
        key_rows = conn.execute(
            "SELECT id, name, key_hash, enabled, expires_at, models, quota_cost, quota_tokens,"
            " quota_period, rpm, concurrency FROM keys ORDER BY id").fetchall()
        grace_rows = conn.execute("SELECT key_hash, key_id, until FROM key_grace").fetchall()
        channel_rows = conn.execute(f"SELECT {CHANNEL_COLUMNS} FROM channels ORDER BY id").fetchall()
    finally:
        conn.execute("COMMIT")
    keys = tuple(KeyConfig(
        id=r["id"], name=r["name"], key_hash=r["key_hash"], enabled=bool(r["enabled"]),
        expires_at=r["expires_at"], models=tuple(json.loads(r["models"])) if r["models"] else None,
        quota_cost=r["quota_cost"], quota_tokens=r["quota_tokens"], quota_period=r["quota_period"], rpm=r["rpm"],
        concurrency=r["concurrency"]) for r in key_rows)
    grace = tuple(GraceSecret(r["key_hash"], r["key_id"], r["until"]) for r in grace_rows)
    channels, disabled = [], []
    for row in channel_rows:
        try:
            (channels if row["enabled"] else disabled).append(row_to_channel(row, catalog.aliases))
        except SecretKeyError as exc:   # a key sealed under a secret key this process lacks
            if row["enabled"]:
                log.error("channel %s left out: %s", row["name"], exc)
    return ConfigSnapshot(rev=rev, keys=keys, grace=grace, channels=tuple(channels),
                          disabled_channels=tuple(disabled), catalog=catalog, read_at=read_at)


def disable_channel(conn, channel_id: int, reason: str, at: float) -> bool:
    """Disable a channel that is enabled, keeping the first reason; True if this call did it."""
    cur = conn.execute("UPDATE channels SET enabled = 0, disabled_reason = ?, disabled_at = ?"
                       " WHERE id = ? AND enabled = 1", (reason, at, channel_id))
    return cur.rowcount == 1


def channel_states(conn) -> list[tuple[str, bool]]:
    """(name, enabled) of every channel (readiness)."""
    return [(r[0], bool(r[1])) for r in conn.execute("SELECT name, enabled FROM channels ORDER BY name")]
