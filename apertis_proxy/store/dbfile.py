"""The database file itself: where it is, who may read it, copies of it.

The file holds upstream keys, so it is created readable by its owner only
(SQLite gives its -wal and -shm files the database file's mode).  Commands
that only read or change existing rows refuse a file that is not there
instead of creating an empty one in whatever directory they were run from.
"""
from __future__ import annotations

import os
import sqlite3
import stat

PRIVATE_MODE = 0o600


class MissingDatabase(FileNotFoundError):
    """The database file a command needs does not exist."""


def create_private(path: str) -> None:
    """Create `path` empty with mode 0600 unless it exists (or is SQLite's in-memory name)."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def require_existing(path: str) -> None:
    """Raise MissingDatabase, naming the absolute path, when `path` is not there."""
    if not os.path.exists(path):
        raise MissingDatabase(
            f"no database at {os.path.abspath(path)}: point at one with --db PATH or APERTIS_DB "
            "(only serve, keys create, channels add and prices set create a new one)")


def readable_by_others(path: str) -> bool:
    """True when group or others may read the file (it holds upstream keys)."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def backup(source: sqlite3.Connection, target_path: str) -> int:
    """Copy the open database `source` to `target_path` with SQLite's online backup API.

    One backup step copies every page inside one read transaction, so the copy
    is a consistent snapshot even while a server writes (WAL readers do not block
    writers).  The copy is written beside the target and renamed into place, so a
    failed backup never leaves a half-written file under the target's name.
    Returns the size of the copy in bytes.
    """
    if os.path.exists(target_path):
        raise FileExistsError(f"{target_path} already exists; remove it or choose another name")
    partial = f"{target_path}.partial-{os.getpid()}"
    create_private(partial)
    try:
        target = sqlite3.connect(partial)
        try:
            source.backup(target)
            # A single file: the copy must not depend on a -wal file beside it.
            target.execute("PRAGMA journal_mode=DELETE")
            check = target.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            target.close()
        if check != "ok":
            raise sqlite3.DatabaseError(f"the copy failed its integrity check: {check}")
        os.replace(partial, target_path)
    except BaseException:
        for leftover in (partial, partial + "-journal"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        raise
    return os.path.getsize(target_path)
