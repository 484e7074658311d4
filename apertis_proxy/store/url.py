"""Where the store lives: a SQLite path or a PostgreSQL URL, and how to name it safely.

    ./apertis.db, sqlite:///abs/path.db, sqlite:///./rel.db   -> SQLite (the embedded default)
    postgresql://user:pass@host:5432/db                       -> PostgreSQL
    postgresql://user@/db?host=/run/postgresql                -> PostgreSQL over a unix socket

The password of a URL never appears in a log line or an error: `redacted()` is
what every message uses, and `scrub()` removes it from driver messages.
"""
from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class StoreURL:
    kind: str          # "sqlite" or "postgresql"
    target: str        # the SQLite path, or the full PostgreSQL URL (with its password)

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgresql"

    def redacted(self) -> str:
        return redact(self.target) if self.is_postgres else self.target

    def scrub(self, text: str) -> str:
        """`text` with this URL's password (if any) replaced by ***."""
        if not self.is_postgres:
            return text
        password = urlsplit(self.target).password
        text = text.replace(self.target, self.redacted())
        return text.replace(password, "***") if password else text


def dialect(conn) -> str:
    """The SQL dialect of an open store connection: "sqlite" (sqlite3) or "postgresql" (PgConnection)."""
    return "sqlite" if isinstance(conn, sqlite3.Connection) else "postgresql"


def parse(value: str) -> StoreURL:
    """Classify a --db / APERTIS_DB value; anything not a URL is a SQLite path."""
    scheme = value.split(":", 1)[0].lower() if "://" in value else ""
    if scheme in POSTGRES_SCHEMES:
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
    """The URL with its password replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))
    except ValueError:
        return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)
