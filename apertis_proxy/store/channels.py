"""Channels: rows of the `channels` table and their plugin-facing form."""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from ..plugin_api import DEFAULT_API_VERSION, Channel
from . import key_encryption
from .keys import KEY_PREFIX as GATEWAY_KEY_PREFIX
from .url import dialect

CHANNEL_COLUMNS = ("id, name, type, base_url, api_key, models, aliases, priority, weight, enabled,"
                   " disabled_reason, disabled_at, api_version, options, created_at")

API_VERSIONS = (DEFAULT_API_VERSION, "2026-10-21")
AUTH_HEADERS = ("x-api-key", "authorization")
OPTION_FLAGS = ("forward_client_version", "forward_extras")

DEFAULT_CHANNEL_NAME = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"
# The first start's channel key; ANTHROPIC_API_KEY is read too, with a warning:
# clients export it for their gateway key, so a shell that has both set would
# otherwise turn a user's own key into the channel key.
BOOTSTRAP_KEY_ENV = "APERTIS_UPSTREAM_API_KEY"
LEGACY_BOOTSTRAP_KEY_ENV = "ANTHROPIC_API_KEY"
# pg_advisory_xact_lock key ("boot") serialising first starts on PostgreSQL, where a
# transaction's count does not keep another host's insert out as SQLite's write lock does.
BOOTSTRAP_LOCK = 0x626F6F74


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
        api_key=key_encryption.open_stored(row["api_key"]), models=frozenset(models) if models else None,
        aliases=aliases,
        priority=row["priority"], weight=row["weight"], api_version=row["api_version"],
        forward_client_version=bool(options.get("forward_client_version", False)),
        forward_extras=bool(options.get("forward_extras", False)),
        auth_header=options.get("auth_header", "x-api-key"), options=options)


def normalize_base_url(url: str) -> str:
    """Check that `url` is an absolute http(s) URL with a host and no user name or password; drop a trailing
    slash.  Error messages show the URL redacted."""
    url = url.strip()
    shown = redact_base_url(url)
    if has_userinfo(url):
        raise ValueError(f"invalid base URL {shown!r}: a user name or password in the URL is not sent upstream; "
                         "give the base URL as https://host[:port][/path] and the credential with --api-key")
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a malformed port  # noqa: B018
    except ValueError as exc:
        raise ValueError(f"invalid base URL {shown!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid base URL {shown!r}: expected http(s)://host[:port][/path]")
    if parts.query or parts.fragment:
        raise ValueError(f"invalid base URL {shown!r}: no query string or fragment allowed")
    return url.rstrip("/")


def _authority(url: str) -> tuple[str, str, str]:
    """(scheme and "//", authority, rest) of a URL, split by hand: it works on URLs urlsplit refuses."""
    scheme, sep, tail = url.partition("//")
    if not sep:
        return "", "", url
    end = min((i for i in (tail.find(c) for c in "/?#") if i >= 0), default=len(tail))
    return scheme + sep, tail[:end], tail[end:]


def has_userinfo(url: str) -> bool:
    """Whether a URL may carry a user name or password: any `@` after the scheme (one in a password holding an
    unencoded `/` sits past where urlsplit ends the authority; a base URL has no other use for it)."""
    return "@" in url.partition("//")[2]


def redact_base_url(url: str) -> str:
    """A channel's base URL fit to print: `https://user:***@host` when it carries a password, `https://***@host`
    for a user name alone (often a token), and everything before an `@` past the authority masked.
    (store.url.redact is for database URLs.)"""
    head, authority, rest = _authority(url)
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        return f"{head}{user + ':***' if colon else '***'}@{host}{rest}"
    if "@" in rest:
        return f"{head}***@{rest.rpartition('@')[2]}"
    return url


def _check_options(api_version: Optional[str], options: Mapping[str, Any]) -> None:
    if api_version is not None and api_version not in API_VERSIONS:
        raise ValueError(f"api version must be one of {', '.join(API_VERSIONS)}")
    auth = options.get("auth_header")
    if auth is not None and auth not in AUTH_HEADERS:
        raise ValueError(f"auth header must be one of {', '.join(AUTH_HEADERS)}")


def _models_json(models) -> Optional[str]:
    return json.dumps(sorted(set(models))) if models else None


def _stored_key(api_key: str) -> str:
    """The value stored for an upstream key: never a gateway key; encrypted when configured."""
    if api_key.startswith(GATEWAY_KEY_PREFIX):
        raise ValueError(f"that is a gateway key ({GATEWAY_KEY_PREFIX}...), which clients send to this "
                         "gateway; a channel needs the upstream provider's key")
    return key_encryption.seal_for_storage(api_key) if api_key else api_key


def add_channel(conn, name: str, base_url: str, api_key: str, *, models=None, priority: int = 0,
                weight: int = 1, aliases: Optional[Mapping[str, str]] = None,
                api_version: str = DEFAULT_API_VERSION, options: Optional[Mapping] = None,
                type: str = "anthropic", enabled: bool = True) -> int:
    """Insert a channel; a name already in use or a bad URL/option raises ValueError."""
    base_url = normalize_base_url(base_url)
    _check_options(api_version, options or {})
    try:
        cur = conn.execute(
            "INSERT INTO channels (name, type, base_url, api_key, models, aliases, priority, weight,"
            " enabled, api_version, options, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (name, type, base_url, _stored_key(api_key), _models_json(models), json.dumps(dict(aliases or {})),
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


# How each upstream key is stored, for listings: "missing", "encrypted" or "plain text".
_KEY_STORAGE = (f"CASE WHEN api_key = '' THEN 'missing'"
                f" WHEN substr(api_key, 1, {len(key_encryption.ENCRYPTED_PREFIX)})"
                f" = '{key_encryption.ENCRYPTED_PREFIX}' THEN 'encrypted' ELSE 'plain text' END")


def list_channels(conn) -> list[dict[str, Any]]:
    """Every channel for display: the upstream key is replaced by `key_set`, a password in the base URL by ***."""
    rows = conn.execute(
        "SELECT id, name, type, base_url, api_key != '' AS key_set,"
        f" {_KEY_STORAGE} AS key_storage, models, aliases, priority,"
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
        d["base_url"] = redact_base_url(d["base_url"])      # a URL stored with userinfo by an older version
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
    # Its health rows go too: a later channel may be given the same id.
    conn.execute("DELETE FROM channel_health WHERE channel_id IN (SELECT id FROM channels WHERE name = ?)",
                 (name,))
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
    if api_key is not None:
        api_key = _stored_key(api_key)
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
    """First start: with APERTIS_UPSTREAM_API_KEY (or ANTHROPIC_API_KEY) set and no
    channel at all, create one.

    Returns a message for the operator (never containing the key), or None
    when there was nothing to say.
    """
    source = BOOTSTRAP_KEY_ENV
    api_key = (env.get(BOOTSTRAP_KEY_ENV) or "").strip()
    if not api_key:
        source = LEGACY_BOOTSTRAP_KEY_ENV
        api_key = (env.get(LEGACY_BOOTSTRAP_KEY_ENV) or "").strip()
    if not api_key:
        return None
    conn.execute("BEGIN IMMEDIATE")
    with conn:   # the check and the insert are one step, even with several starters
        if dialect(conn) == "postgresql":
            conn.execute("SELECT pg_advisory_xact_lock(?)", (BOOTSTRAP_LOCK,))
        if channel_count(conn):
            return None
        if api_key.startswith(GATEWAY_KEY_PREFIX):
            return (f"warning: {source} holds a gateway key ({GATEWAY_KEY_PREFIX}...), not an upstream "
                    f"key: no channel created; set {BOOTSTRAP_KEY_ENV} to the upstream provider's key")
        add_channel(conn, DEFAULT_CHANNEL_NAME, DEFAULT_BASE_URL, api_key)
    message = (f"created channel {DEFAULT_CHANNEL_NAME!r} -> {DEFAULT_BASE_URL} "
               f"with the key from {source}")
    if source == LEGACY_BOOTSTRAP_KEY_ENV:
        message += (f"\nwarning: {LEGACY_BOOTSTRAP_KEY_ENV} is also what clients use for their gateway key;"
                    f" give the first start its own variable, {BOOTSTRAP_KEY_ENV}")
    return message


def key_storage(conn) -> list[dict[str, Any]]:
    """Per channel: name and how its key is stored ("missing", "encrypted", "plain text"),
    and for encrypted ones whether the configured secret key opens it."""
    box = key_encryption.from_environment()
    out = []
    for row in conn.execute(f"SELECT name, api_key, {_KEY_STORAGE} AS storage FROM channels ORDER BY id"):
        opens = None
        if row["storage"] == "encrypted" and box is not None:
            try:
                box.open(row["api_key"])
                opens = True
            except key_encryption.SecretKeyError:
                opens = False
        out.append({"name": row["name"], "storage": row["storage"], "opens": opens})
    return out


def reencrypt_keys(conn, box: "key_encryption.KeyBox") -> int:
    """Store every upstream key encrypted under `box`'s first key; returns how many were written.

    One transaction: a key that no configured secret key opens stops it with
    nothing changed.
    """
    conn.execute("BEGIN IMMEDIATE")
    with conn:
        rows = conn.execute("SELECT id, api_key FROM channels WHERE api_key != ''").fetchall()
        for row in rows:
            conn.execute("UPDATE channels SET api_key = ? WHERE id = ?", (box.reseal(row["api_key"]), row["id"]))
    return len(rows)


def _require_one(cur, name: str) -> None:
    if cur.rowcount == 0:
        raise LookupError(f"no channel named {name!r}")
