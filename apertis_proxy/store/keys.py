"""User keys: generated once, stored only as a SHA-256 hash."""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from typing import Any, Iterable, Optional

KEY_PREFIX = "sk-apx-"

# Columns `update_key` may change, with None meaning "no limit" for each.
LIMIT_FIELDS = ("models", "quota_cost", "quota_tokens", "quota_period", "rpm", "concurrency", "expires_at",
                "note")


def generate_key() -> str:
    # 32 random bytes: a hash without salt is safe for keys of this entropy and
    # keeps the lookup a single indexed equality.
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def display_prefix(plain: str) -> str:
    return plain[: len(KEY_PREFIX) + 4] + "..."


def _models_json(models: Optional[Iterable[str]]) -> Optional[str]:
    return json.dumps(sorted(set(models))) if models else None


def create_key(conn, name: str, *, models=None, quota_cost=None, quota_tokens=None, quota_period=None,
               rpm=None, concurrency=None, expires_at=None, note=None) -> tuple[int, str]:
    """Insert a key; returns (id, plain key).  The plain key is never stored.

    A name already in use raises ValueError.
    """
    plain = generate_key()
    try:
        cur = conn.execute(
            "INSERT INTO keys (id, name, key_hash, key_prefix, enabled, created_at, expires_at, models,"
            " quota_cost, quota_tokens, quota_period, rpm, concurrency, note)"
            f" VALUES ({_NEXT_ID},?,?,?,1,?,?,?,?,?,?,?,?,?)",
            (name, hash_key(plain), display_prefix(plain), time.time(), expires_at,
             _models_json(models), quota_cost, quota_tokens, quota_period, rpm, concurrency, note))
    except sqlite3.IntegrityError:
        if get_key(conn, name) is not None:
            raise ValueError(f"a key named {name!r} already exists") from None
        raise
    return cur.lastrowid, plain


# Never a deleted key's id: the ledger's rows of that key must not become another's.
_NEXT_ID = ("(SELECT MAX(m) + 1 FROM (SELECT COALESCE(MAX(id), 0) AS m FROM keys"
            " UNION ALL SELECT COALESCE(MAX(id), 0) FROM deleted_keys) AS ids)")


def get_key(conn, name: str) -> Optional[dict[str, Any]]:
    """One key with its settled spend, or None.  Never includes the hash."""
    rows = _select_keys(conn, "WHERE k.name = ?", (name,))
    return rows[0] if rows else None


def list_keys(conn) -> list[dict[str, Any]]:
    """Every key with its settled spend, oldest first.  Never includes the hash."""
    return _select_keys(conn, "", ())


def _select_keys(conn, where: str, params: tuple) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT k.id, k.name, k.key_prefix, k.enabled, k.created_at, k.expires_at, k.models,"
        " k.quota_cost, k.quota_tokens, k.quota_period, k.rpm, k.concurrency, k.note,"
        " COALESCE(s.cost, 0) AS spent_cost, COALESCE(s.tokens, 0) AS spent_tokens"
        " FROM keys k LEFT JOIN key_spend s ON s.key_id = k.id " + where + " ORDER BY k.id",
        params).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["enabled"] = bool(d["enabled"])
        d["models"] = json.loads(d["models"]) if d["models"] else None
        out.append(d)
    return out


def set_key_enabled(conn, name: str, enabled: bool) -> None:
    cur = conn.execute("UPDATE keys SET enabled = ? WHERE name = ?", (1 if enabled else 0, name))
    _require_one(cur, name)


def delete_key(conn, name: str) -> None:
    """Delete a key; its settled spend goes with it.  Its id, name and dates stay in
    `deleted_keys`, and the ledger's rows keep naming it."""
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        cur = conn.execute(
            "INSERT OR REPLACE INTO deleted_keys (id, name, key_prefix, created_at, deleted_at, note)"
            " SELECT id, name, key_prefix, created_at, ?, note FROM keys WHERE name = ?",
            (time.time(), name))
        _require_one(cur, name)
        conn.execute("DELETE FROM keys WHERE name = ?", (name,))


def rotate_key(conn, name: str, grace_seconds: float = 0.0) -> tuple[str, float]:
    """Give the key a new secret; everything else about it stays.

    The old secret keeps working until the returned time (now + grace).  Returns
    (new plain key, until).
    """
    plain = generate_key()
    now = time.time()
    until = now + max(0.0, grace_seconds)
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        row = conn.execute("SELECT id, key_hash, key_prefix FROM keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise LookupError(f"no key named {name!r}")
        conn.execute("DELETE FROM key_grace WHERE key_id = ? AND until < ?", (row["id"], now))
        # Recorded even without a grace period: it tells a running server that
        # this is the same key with a new secret, not a new key.
        conn.execute("INSERT OR REPLACE INTO key_grace (key_hash, key_id, key_prefix, until)"
                     " VALUES (?,?,?,?)", (row["key_hash"], row["id"], row["key_prefix"], until))
        conn.execute("UPDATE keys SET key_hash = ?, key_prefix = ? WHERE id = ?",
                     (hash_key(plain), display_prefix(plain), row["id"]))
    return plain, until


def old_secrets(conn) -> dict[str, list[dict[str, Any]]]:
    """Key name -> its rotated-out secrets still accepted (prefix, until), for listings."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in conn.execute("SELECT k.name, g.key_prefix, g.until FROM key_grace g JOIN keys k"
                          " ON k.id = g.key_id WHERE g.until > ? ORDER BY g.until", (time.time(),)):
        out.setdefault(r["name"], []).append({"key_prefix": r["key_prefix"], "until": r["until"]})
    return out


def update_key(conn, name: str, **changes: Any) -> None:
    """Change limits of a key; each of LIMIT_FIELDS given (None clears it) is written."""
    unknown = set(changes) - set(LIMIT_FIELDS)
    if unknown:
        raise TypeError(f"unknown key field(s): {', '.join(sorted(unknown))}")
    if not changes:
        if get_key(conn, name) is None:
            raise LookupError(f"no key named {name!r}")
        return
    if "models" in changes:
        changes["models"] = _models_json(changes["models"])
    cols = ", ".join(f"{c} = ?" for c in changes)
    cur = conn.execute(f"UPDATE keys SET {cols} WHERE name = ?", (*changes.values(), name))
    _require_one(cur, name)


def _require_one(cur, name: str) -> None:
    if cur.rowcount == 0:
        raise LookupError(f"no key named {name!r}")
