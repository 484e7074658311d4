"""Channels: rows of the `channels` table and their plugin-facing form."""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from ..plugin_api import Channel

CHANNEL_COLUMNS = ("id, name, type, base_url, api_key, models, aliases, priority, weight, enabled,"
                   " disabled_reason, disabled_at, api_version, options, created_at")

API_VERSIONS = ("2023-06-01", "2026-10-21")
AUTH_HEADERS = ("x-api-key", "authorization")
OPTION_FLAGS = ("forward_client_version", "forward_extras")

DEFAULT_CHANNEL_NAME = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"


def row_to_channel(row, default_aliases: Optional[Mapping[str, str]] = None) -> Channel:
    """A `channels` row (selected with CHANNEL_COLUMNS) -> Channel.

    The channel's own aliases override the catalogue's default ones.
    """
    options = json.loads(row["options"] or "{}")
    aliases = dict(default_aliases or {})
    aliases.update(json.loads(row["aliases"] or "{}"))
    models = json.loads(row["models"]) if row["models"] else None
    return Channel(
        id=row["id"], name=row["name"], type=row["type"], base_url=row["base_url"].rstrip("/"),
        api_key=row["api_key"], models=frozenset(models) if models else None, aliases=aliases,
        priority=row["priority"], weight=row["weight"], api_version=row["api_version"],
        forward_client_version=bool(options.get("forward_client_version", False)),
        forward_extras=bool(options.get("forward_extras", False)),
        auth_header=options.get("auth_header", "x-api-key"), options=options)


def normalize_base_url(url: str) -> str:
    """Check that `url` is an absolute http(s) URL with a host; drop a trailing slash."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # raises ValueError on a malformed port  # noqa: B018
    except ValueError as exc:
        raise ValueError(f"invalid base URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid base URL {url!r}: expected http(s)://host[:port][/path]")
    if parts.query or parts.fragment:
        raise ValueError(f"invalid base URL {url!r}: no query string or fragment allowed")
    return url.strip().rstrip("/")


def _check_options(api_version: Optional[str], options: Mapping[str, Any]) -> None:
    if api_version is not None and api_version not in API_VERSIONS:
        raise ValueError(f"api version must be one of {', '.join(API_VERSIONS)}")
    auth = options.get("auth_header")
    if auth is not None and auth not in AUTH_HEADERS:
        raise ValueError(f"auth header must be one of {', '.join(AUTH_HEADERS)}")


def _models_json(models) -> Optional[str]:
    return json.dumps(sorted(set(models))) if models else None


def add_channel(conn, name: str, base_url: str, api_key: str, *, models=None, priority: int = 0,
                weight: int = 1, aliases: Optional[Mapping[str, str]] = None,
                api_version: str = "2023-06-01", options: Optional[Mapping] = None,
                type: str = "anthropic", enabled: bool = True) -> int:
    """Insert a channel; a name already in use or a bad URL/option raises ValueError."""
    base_url = normalize_base_url(base_url)
    _check_options(api_version, options or {})
    try:
        cur = conn.execute(
            "INSERT INTO channels (name, type, base_url, api_key, models, aliases, priority, weight,"
            " enabled, api_version, options, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (name, type, base_url, api_key, _models_json(models), json.dumps(dict(aliases or {})),
             priority, weight, 1 if enabled else 0, api_version, json.dumps(dict(options or {})),
             time.time()))
    except sqlite3.IntegrityError:
        if _channel_id(conn, name) is not None:
            raise ValueError(f"a channel named {name!r} already exists") from None
        raise
    return cur.lastrowid


def _channel_id(conn, name: str) -> Optional[int]:
    row = conn.execute("SELECT id FROM channels WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def channel_count(conn) -> int:
    return conn.execute("SELECT COUNT(*) FROM channels").fetchone()[0]


def get_channel(conn, name: str, default_aliases: Optional[Mapping[str, str]] = None) -> Channel:
    """The channel named `name` (with its key: for sending, never for printing)."""
    row = conn.execute(f"SELECT {CHANNEL_COLUMNS} FROM channels WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise LookupError(f"no channel named {name!r}")
    return row_to_channel(row, default_aliases)


def list_channels(conn) -> list[dict[str, Any]]:
    """Every channel for display: the upstream key is replaced by `key_set`."""
    rows = conn.execute(
        "SELECT id, name, type, base_url, api_key != '' AS key_set, models, aliases, priority,"
        " weight, enabled, disabled_reason, disabled_at, api_version, options, created_at"
        " FROM channels ORDER BY priority DESC, id").fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["key_set"] = bool(d["key_set"])
        d["enabled"] = bool(d["enabled"])
        d["models"] = json.loads(d["models"]) if d["models"] else None
        d["aliases"] = json.loads(d["aliases"] or "{}")
        d["options"] = json.loads(d["options"] or "{}")
        out.append(d)
    return out


def set_channel_enabled(conn, name: str, enabled: bool, reason: Optional[str] = None) -> None:
    """Enable (clearing any disabled reason) or disable a channel, keeping `reason`."""
    if enabled:
        cur = conn.execute("UPDATE channels SET enabled = 1, disabled_reason = NULL,"
                           " disabled_at = NULL WHERE name = ?", (name,))
    else:
        cur = conn.execute("UPDATE channels SET enabled = 0, disabled_reason = ?, disabled_at = ?"
                           " WHERE name = ?", (reason, time.time(), name))
    _require_one(cur, name)


def remove_channel(conn, name: str) -> None:
    cur = conn.execute("DELETE FROM channels WHERE name = ?", (name,))
    _require_one(cur, name)


_UNSET: Any = object()


def update_channel(conn, name: str, *, base_url: Optional[str] = None,
                   api_key: Optional[str] = None, models=_UNSET, priority: Optional[int] = None,
                   weight: Optional[int] = None, set_aliases: Optional[Mapping[str, str]] = None,
                   remove_aliases=(), clear_aliases: bool = False,
                   api_version: Optional[str] = None,
                   options: Optional[Mapping[str, Any]] = None) -> None:
    """Edit a channel: arguments left at None keep the stored value.

    `models=None` means "serve any model"; leave it out to keep the list.
    Aliases are merged: `clear_aliases` first, then `remove_aliases`, then
    `set_aliases`.  `options` is merged into the stored options.
    """
    if base_url is not None:
        base_url = normalize_base_url(base_url)
    _check_options(api_version, options or {})
    conn.execute("BEGIN IMMEDIATE")
    with conn:   # commits, or rolls back on an exception
        row = conn.execute("SELECT aliases, options FROM channels WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise LookupError(f"no channel named {name!r}")
        aliases = {} if clear_aliases else json.loads(row["aliases"] or "{}")
        for client_name in remove_aliases:
            aliases.pop(client_name, None)
        aliases.update(set_aliases or {})
        merged_options = json.loads(row["options"] or "{}")
        merged_options.update(options or {})
        changes: dict[str, Any] = {"aliases": json.dumps(aliases),
                                   "options": json.dumps(merged_options)}
        for column, value in (("base_url", base_url), ("api_key", api_key), ("priority", priority),
                              ("weight", weight), ("api_version", api_version)):
            if value is not None:
                changes[column] = value
        if models is not _UNSET:
            changes["models"] = _models_json(models)
        cols = ", ".join(f"{c} = ?" for c in changes)
        conn.execute(f"UPDATE channels SET {cols} WHERE name = ?", (*changes.values(), name))


def bootstrap_default_channel(conn, env: Mapping[str, str]) -> Optional[str]:
    """First start: with ANTHROPIC_API_KEY set and no channel at all, create one.

    Returns a message for the operator (never containing the key), or None
    when nothing was created.
    """
    api_key = (env.get("ANTHROPIC_API_KEY") or "").strip()
    if not api_key:
        return None
    conn.execute("BEGIN IMMEDIATE")
    with conn:   # the check and the insert are one step, even with several starters
        if channel_count(conn):
            return None
        add_channel(conn, DEFAULT_CHANNEL_NAME, DEFAULT_BASE_URL, api_key)
    return (f"created channel {DEFAULT_CHANNEL_NAME!r} -> {DEFAULT_BASE_URL} "
            f"with the key from ANTHROPIC_API_KEY")


def _require_one(cur, name: str) -> None:
    if cur.rowcount == 0:
        raise LookupError(f"no channel named {name!r}")
