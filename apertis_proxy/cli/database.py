"""The store a command works on: --db, else APERTIS_DB, else ./apertis.db."""
from __future__ import annotations

import contextlib
import os
import shlex
import sqlite3
from typing import Iterator

from ..store import service as store_service
from ..store.url import parse as parse_db_url

DEFAULT_DB = "./apertis.db"

# Commands that may create the database; every other one refuses a missing file.
_CREATING = {("keys", "create"), ("channels", "add"), ("prices", "set")}


def db_path(args) -> str:
    return getattr(args, "db", None) or os.environ.get("APERTIS_DB") or DEFAULT_DB


def open_store(args) -> contextlib.AbstractContextManager:
    """The store of `args`, created only by the commands that may create it."""
    return open_path(db_path(args), create=(args.command, getattr(args, "action", None)) in _CREATING)


@contextlib.contextmanager
def open_path(path: str, *, create: bool = True) -> Iterator:
    """A connection to the store at `path` (a file or a database URL), schema made current."""
    url = parse_db_url(path)
    try:
        conn = store_service.connect(url, create=create)
    except sqlite3.Error as exc:
        raise OSError(f"cannot open database {url.redacted()}: {exc}") from None
    try:
        yield conn
    finally:
        conn.close()


def command_line(db: str, *words: str) -> str:
    """An `apertis-proxy` command to suggest, with --db unless `db` is the default."""
    db_flag = [] if db == DEFAULT_DB else ["--db", parse_db_url(db).redacted()]
    return " ".join(["apertis-proxy", *words, *(shlex.quote(w) for w in db_flag)])


def redacted(args, message: str) -> str:
    """`message` without the password of any database URL given (a driver may quote the URL)."""
    for value in (db_path(args), getattr(args, "source", None), getattr(args, "target", None)):
        try:
            message = parse_db_url(value).scrub(message) if value else message
        except ValueError:
            pass
    return message
