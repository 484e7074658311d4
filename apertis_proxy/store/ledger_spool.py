"""The ledger spool: usage rows made durable on local disk before they are shipped.

Each worker appends one JSON line per row to its own segment file with
os.write (a segment named *.spool2 starts with a header line, {"fields": [...]},
and holds each row as a JSON array of its values in that order: cheaper to
write than an object; one named *.spool holds JSON objects): once the call
returns the row is in the kernel's page cache, so a `kill -9` of the process
loses nothing (only a crash of the machine itself can, and `fsync` bounds
that).  Shipping seals the current segment (new rows
go to a fresh one), writes the sealed rows to the database, and deletes the
segment only after that transaction committed.

A segment is locked (flock) by the worker that owns it for as long as it
exists; a segment nobody holds a lock on belongs to a dead worker and is
adopted: read, shipped and deleted by whoever locks it first.  A segment is
created under a temporary name and renamed only once locked, so a live
worker's segment is never seen unlocked.

Bounded: past `warn_bytes` the spool logs a warning; at `max_bytes` it says
`full` (the gateway then refuses new requests with 503 overloaded_error until
shipping catches up) and logs an error.  Rows of requests already admitted
are still written: nothing acknowledged is dropped.
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from typing import Any, Optional, Sequence

import orjson

from .ledger_write import FieldValues, RowFields
from .url import parse

SUFFIX = ".spool"           # rows as JSON objects
TUPLE_SUFFIX = ".spool2"    # a header naming the fields, then rows as JSON arrays (see the docstring)
SUFFIXES = (SUFFIX, TUPLE_SUFFIX)
FSYNC_MODES = ("always", "batch", "never")


def default_spool_dir(db: str) -> str:
    """Where a worker spools when `[ledger] spool_dir` is not set: beside a SQLite file; for a database
    URL (no file on this host) in the working directory (the URL may hold a password: never a path)."""
    url = parse(db)
    return "apertis-ledger.spool" if url.is_postgres else url.target + ".spool"


class Segment:
    """One spool file and the rows it holds: each as this worker appended it (a row object, shipped
    from memory and never parsed back) or as read from an adopted file (one JSON line, bytes)."""

    __slots__ = ("path", "fd", "lines", "size", "fields")

    def __init__(self, path: str, fd: int, lines: Optional[list] = None,
                 fields: Optional[RowFields] = None) -> None:
        self.path, self.fd = path, fd
        self.fields = fields        # the header's field names: what an array line's values are
        self.lines: list[Any] = lines if lines is not None else []
        self.size = sum(len(line) for line in self.lines)

    def rows(self, log: logging.Logger) -> list:
        out = []
        for line in self.lines:
            if type(line) is not bytes:
                out.append(line)
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                # Only a machine crash mid-write can leave a torn line.
                log.error("ledger spool %s: an unreadable line left out: %r", self.path, line[:200])
                continue
            if isinstance(row, dict):
                out.append(row)
            elif isinstance(row, list) and self.fields is not None and len(row) == len(self.fields.names):
                out.append(FieldValues(self.fields, tuple(row)))
            else:
                log.error("ledger spool %s: a line of an unknown shape left out: %r", self.path, line[:200])
        return out

    def release(self) -> None:
        """Delete the file (its rows are in the database), then let the lock go."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


class LedgerSpool:
    def __init__(self, directory: str, log: logging.Logger, *, max_bytes: int = 256 << 20,
                 warn_bytes: int = 16 << 20, fsync: str = "batch", fields: Optional[Sequence[str]] = None) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"ledger spool fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        self.directory = directory
        self.log = log
        self.max_bytes = max_bytes
        self.warn_bytes = min(warn_bytes, max_bytes)
        self.fsync = fsync
        # With `fields`, segments are *.spool2 and rows are appended as arrays of those fields' values.
        self.fields = RowFields(fields, fields) if fields is not None else None
        self._header = (orjson.dumps({"fields": list(fields)}, option=orjson.OPT_APPEND_NEWLINE)
                        if fields is not None else b"")
        self._name = f"ledger-{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = 0
        self.current: Optional[Segment] = None
        self.sealed: list[Segment] = []     # waiting to be shipped, oldest first
        self.size = 0                       # bytes in every segment this worker holds
        self.full = False
        self._warned = False
        self.write_errors = 0

    def open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self.current = self._new_segment()

    def _new_segment(self) -> Segment:
        self._seq += 1
        suffix = TUPLE_SUFFIX if self._header else SUFFIX
        final = os.path.join(self.directory, f"{self._name}-{self._seq}{suffix}")
        temp = os.path.join(self.directory, f".{self._name}-{self._seq}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if self._header:
            os.write(fd, self._header)      # before the name: a segment is never seen without it
        os.rename(temp, final)
        return Segment(final, fd, fields=self.fields)

    # -- request path ----------------------------------------------------------

    def append(self, line: bytes, row: Any = None) -> None:
        """Make one row durable (see the module's docstring); it also stays in memory, as `row` (what
        `line` encodes, in a form store.write_ledger takes) when given."""
        seg = self.current
        assert seg is not None
        seg.lines.append(line if row is None else row)
        seg.size += len(line)
        self._grew(len(line))
        try:
            written = os.write(seg.fd, line)
            if written != len(line):        # a short write (disk full): the rest, or an error
                os.write(seg.fd, line[written:])
            if self.fsync == "always":
                os.fsync(seg.fd)
        except OSError as exc:
            # Kept in memory and shipped from there; only its durability is lost, loudly.
            self.write_errors += 1
            self.log.error("ledger spool %s unwritable (%s): a usage row is held in memory only",
                           seg.path, exc)

    def _grew(self, n: int) -> None:
        self.size += n
        if self.size >= self.max_bytes and not self.full:
            self.full = True
            self.log.error("ledger spool full (%d bytes in %s, max_bytes %d): the database is not taking "
                           "usage rows; new requests are refused with 503 until it does",
                           self.size, self.directory, self.max_bytes)
        elif self.size >= self.warn_bytes and not self._warned:
            self._warned = True
            self.log.warning("ledger spool growing: %d bytes in %s waiting for the database (warn_bytes %d, "
                             "max_bytes %d)", self.size, self.directory, self.warn_bytes, self.max_bytes)

    def _shrank(self, n: int) -> None:
        self.size -= n
        if self.full and self.size < self.max_bytes:
            self.full = False
            self.log.warning("ledger spool below max_bytes again (%d bytes): requests are admitted", self.size)
        if self._warned and self.size < self.warn_bytes // 2:
            self._warned = False
            self.log.info("ledger spool drained (%d bytes)", self.size)

    # -- shipping --------------------------------------------------------------

    def seal(self) -> list[Segment]:
        """Every segment waiting to be shipped, oldest first, the current one
        included when it holds rows (new rows go to a fresh segment)."""
        seg = self.current
        if seg is not None and seg.lines:
            if self.fsync == "batch":
                try:
                    os.fsync(seg.fd)
                except OSError as exc:
                    self.log.error("ledger spool %s: fsync failed (%s)", seg.path, exc)
            self.sealed.append(seg)
            self.current = self._new_segment()
        return list(self.sealed)

    def shipped(self, seg: Segment) -> None:
        """`seg`'s rows are committed: delete it."""
        self.sealed.remove(seg)
        self._shrank(seg.size)
        seg.release()

    def adopt(self) -> int:
        """Take over the segments of dead workers (unlocked ones); they join the
        sealed segments.  Returns how many rows were adopted."""
        adopted = 0
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return 0
        mine = {s.path for s in self.sealed}
        if self.current is not None:
            mine.add(self.current.path)
        for name in names:
            path = os.path.join(self.directory, name)
            # A worker that died between creating a segment and naming it leaves
            # an empty temporary file; a young one may be a live worker's, mid-creation.
            leftover_temp = name.startswith(".ledger-") and name.endswith(".tmp") and _older_than(path, 60)
            if path in mine or not (name.endswith(SUFFIXES) or leftover_temp):
                continue
            seg = self._lock(path)
            if seg is None:
                continue
            if leftover_temp:
                seg.release()
                continue
            self.sealed.append(seg)
            self._grew(seg.size)
            adopted += len(seg.lines)
            if seg.lines:
                self.log.warning("adopted %d usage rows from the ledger spool of a stopped worker (%s)",
                                 len(seg.lines), name)
        return adopted

    @staticmethod
    def _lock(path: str) -> Optional[Segment]:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None         # shipped and deleted meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)        # a live worker's
            return None
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)        # its owner deleted it as we opened it
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        fields, lines = parse_segment(data)
        return Segment(path, fd, lines, fields)

    def close(self) -> None:
        """Let go of every segment: empty ones are deleted, the others stay for
        whoever starts next (they are adopted then)."""
        for seg in [*self.sealed, *([self.current] if self.current else [])]:
            if seg.lines:
                os.close(seg.fd)
            else:
                seg.release()
        self.sealed = []
        self.current = None

    @property
    def pending(self) -> int:
        return sum(len(s.lines) for s in self.sealed) + (len(self.current.lines) if self.current else 0)


def parse_segment(data: bytes) -> tuple[Optional[RowFields], list[bytes]]:
    """A segment file's content: the fields its header names (None without one) and its row lines."""
    lines = [line + b"\n" for line in data.split(b"\n") if line]
    fields = None
    if lines and lines[0].startswith(b'{"fields":'):
        try:
            names = orjson.loads(lines[0])["fields"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            names = None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            fields = RowFields(names, names)      # values as spooled: each converted if it needs to be
            lines = lines[1:]
    return fields, lines


def spooled_rows(directory: str) -> list[dict]:
    """Every row in the segment files under `directory`, oldest segment first, as field -> value (for
    inspection and tests; a segment deleted meanwhile is skipped)."""
    out: list[dict] = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIXES))
    except FileNotFoundError:
        return out
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                fields, lines = parse_segment(f.read())
        except FileNotFoundError:
            continue
        seg = Segment(name, -1, lines, fields)
        out.extend(r.as_dict() if isinstance(r, FieldValues) else r for r in seg.rows(logging.getLogger(__name__)))
    return out


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except FileNotFoundError:
        return False
