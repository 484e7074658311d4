"""Where the store lives: a SQLite path or a PostgreSQL URL, and how to name it safely.

    ./apertis.db, sqlite:///abs/path.db, sqlite:///./rel.db   -> SQLite (the embedded default)
    postgresql://user:pass@host:5432/db                       -> PostgreSQL
    postgresql://user@/db?host=/run/postgresql                -> PostgreSQL over a unix socket

The user information of a PostgreSQL URL is everything between `://` and the last `@` that is followed by a
host part (host names or addresses, numeric ports, commas; possibly empty), so a password generated with
`/`, `+`, `=`, `#`, `?`, `:` or `@` in it is taken whole, as it is.  A percent-encoded one (`%2F`) is decoded
as well: a literal `%` in a password is written `%25`.  The driver gets `dsn`, the URL with its user and
password percent-encoded again, never the value as given.  (An `@` in the query string is written `%40`.)

The password of a URL never appears in a log line or an error: `redacted()` is
what every message uses, `scrub()` removes it from driver messages, and an error
about a malformed URL names it redacted and quotes none of its parts.
"""
from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote, unquote

POSTGRES_SCHEMES = ("postgresql", "postgres")

# The host part of a PostgreSQL URL: host names, addresses ([v6] too) or a %-encoded socket directory,
# each with an optional numeric port, separated by commas; empty for the default (unix socket) host.
_HOST = r"(?:\[[0-9A-Za-z:.%]*\]|[0-9A-Za-z._~%-]*)(?::[0-9]+)?"
_HOSTSPEC = re.compile(rf"{_HOST}(?:,{_HOST})*")
# A password in the query string (libpq's ?password=...): redacted as well.
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


@dataclass(frozen=True)
class PgParts:
    """A PostgreSQL URL taken apart: user and password as written and decoded, and the rest as written."""
    scheme: str
    raw_user: Optional[str]         # None: no user information at all
    raw_password: Optional[str]     # None: no ':' in the user information
    rest: str                       # the host part and what follows it (/db?query)

    @property
    def user(self) -> Optional[str]:
        return None if self.raw_user is None else unquote(self.raw_user)

    @property
    def password(self) -> Optional[str]:
        return None if self.raw_password is None else unquote(self.raw_password)


def _is_hostspec(rest: str) -> bool:
    return _HOSTSPEC.fullmatch(re.split(r"[/?#]", rest, maxsplit=1)[0]) is not None


def split_pg(url: str) -> Optional[PgParts]:
    """`url` (scheme://...) taken apart at the last `@` followed by a host part; None if it has none."""
    scheme, _, after = url.partition("://")
    for at in reversed([m.start() for m in re.finditer("@", after)]):
        if _is_hostspec(after[at + 1:]):
            user, colon, password = after[:at].partition(":")
            return PgParts(scheme, user, password if colon else None, after[at + 1:])
    if "@" not in after and _is_hostspec(after):
        return PgParts(scheme, None, None, after)
    return None


@dataclass(frozen=True)
class StoreURL:
    kind: str          # "sqlite" or "postgresql"
    target: str        # the SQLite path, or the PostgreSQL URL as given (with its password)

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgresql"

    @property
    def dsn(self) -> str:
        """What the driver connects to: the URL with its user and password percent-encoded (asyncpg
        decodes them), so reserved characters in a password reach the server unchanged."""
        parts = split_pg(self.target) if self.is_postgres else None
        if parts is None or parts.raw_user is None:
            return self.target
        userinfo = quote(parts.user, safe="")
        if parts.password is not None:
            userinfo += ":" + quote(parts.password, safe="")
        return f"{parts.scheme}://{userinfo}@{parts.rest}"

    def redacted(self) -> str:
        return redact(self.target) if self.is_postgres else self.target

    def scrub(self, text: str) -> str:
        """`text` with this URL's password (if any), in every form it may be quoted in, replaced by ***."""
        if not self.is_postgres:
            return text
        for url in sorted({self.target, self.dsn}, key=len, reverse=True):
            text = text.replace(url, redact(url))
        secrets = set(_query_passwords(self.target))
        parts = split_pg(self.target)
        if parts is not None and parts.raw_password:
            secrets |= {parts.raw_password, parts.password, quote(parts.password, safe="")}
        for secret in sorted((s for s in secrets if s), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


def _query_passwords(url: str) -> list[str]:
    values = [m.group(0)[len(m.group(1)):] for m in _QUERY_PASSWORD.finditer(url)]
    return values + [unquote(v) for v in values] + [quote(unquote(v), safe="") for v in values]


def dialect(conn) -> str:
    """The SQL dialect of an open store connection: "sqlite" (sqlite3) or "postgresql" (PgConnection)."""
    return "sqlite" if isinstance(conn, sqlite3.Connection) else "postgresql"


def parse(value: str) -> StoreURL:
    """Classify a --db / APERTIS_DB value; anything not a URL is a SQLite path.

    A PostgreSQL URL without a readable host part is a ValueError naming it redacted."""
    scheme = value.split(":", 1)[0].lower() if "://" in value else ""
    if scheme in POSTGRES_SCHEMES:
        if split_pg(value) is None:
            raise ValueError(f"cannot read the database URL {redact(value)}: expected"
                             " postgresql://user:password@host:port/database (the port a number)")
        return StoreURL("postgresql", value)
    if scheme == "sqlite":
        path = value[len("sqlite://"):]
        # sqlite:///abs/path -> /abs/path; sqlite:///./rel -> ./rel
        if path.startswith("/./") or path.startswith("/../"):
            path = path[1:]
        if not path or path == "/":
            raise ValueError("sqlite:// URL without a path; use sqlite:///path/to/apertis.db")
        return StoreURL("sqlite", path)
    if scheme:
        raise ValueError(f"unsupported database URL scheme {scheme!r}: use a file path, sqlite:///path or "
                         "postgresql://user@host/db")
    return StoreURL("sqlite", value)


def redact(url: str) -> str:
    """The URL with its password replaced by ***.  One that cannot be taken apart keeps only its scheme
    and user: whatever follows may hold a password."""
    parts = split_pg(url)
    scheme, _, after = url.partition("://")
    if parts is not None:
        if parts.raw_password is not None:
            url = f"{parts.scheme}://{parts.raw_user}:***@{parts.rest}"
    elif "@" in after:
        user = after.rpartition("@")[0].partition(":")[0]
        url = f"{scheme}://{user}:***@{after.rpartition('@')[2]}"
    else:
        url = f"{scheme}://{re.split(r'[:/?#]', after, maxsplit=1)[0]}:***"
    return _QUERY_PASSWORD.sub(r"\1***", url)
