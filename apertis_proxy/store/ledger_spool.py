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

A request may be billed once it went upstream, and a stream's usage is
reported in parts: message_start's input is billed whether or not the stream
ends.  A *sent* line (["sent", {fields}]) is written as the request goes
upstream, and a stream's *interim* row (["interim", [values...]]) when its
first report arrives; a live worker ships neither: the request's later line,
and at last its final row, replaces it.  Each new segment starts with the
latest such line of every request still running (written before the segment
is named), so a worker's newest segment holds the only copies that count.
When a worker dies, its adopter ships each request's last line in the newest
segment unless that segment holds the request's final row (a sent line
becomes a row whose usage is unknown: cost NULL, error_type gateway_stopped),
and ignores such lines in older segments.

A full disk costs durability only: a row that cannot be written whole is kept
in memory (loudly), the segment is cut back to its last whole line so later
rows stay readable, and when no new segment can be created rows go to one in
memory until one can.

A spool directory belongs to one database.  Its rows name that database's keys, so shipped into another
they would be billed to whatever keys have those ids there: two gateways of different databases given one
spool_dir (two configurations copied from one file; two PostgreSQL-backed gateways started in one working
directory, where both default to ./apertis-ledger.spool) must not adopt each other's segments.  The
directory is marked once, by the first worker that uses it, with a file (OWNER_FILE: the database's
identity, store/schema.py's DATABASE_ID, and its name, redacted, for the operator) made whole under a
temporary name and linked into place, so of two workers marking it together one wins and the other reads
the winner's mark.  A worker of another database refuses the directory at start (SpoolOfAnotherDatabase):
it neither adopts its segments nor adds its own.  One mark for the whole directory rather than one in each
segment: segments are created and deleted all the time, the directory stays, so the mistake shows at the
first start, before any row was spooled beside the other database's, and a segment moved in by hand is
shipped as the operator meant.  A directory without a mark (made by an earlier version) is marked by the
first worker of this version that uses it, its segments adopted as before; moving a directory to another
host of the same database keeps its mark valid.

Bounded (counting the rows waiting, and each running request's latest line
once): past `warn_bytes` the spool logs a warning; at `max_bytes` it says
`full` (the gateway then refuses new requests with 503 overloaded_error until
shipping catches up) and logs an error.  Rows of requests already admitted
are still written: nothing acknowledged is dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import time
from typing import Any, Optional, Sequence

import orjson

from ..plugin_api import UsageRecord, stopped_attempt
from .ledger_write import FieldValues, LedgerRows, RowFields, logged_row
from .url import parse

INTERIM = b'["interim",'      # how an interim row's line starts (see the docstring)
SENT = b'["sent",'            # a request that went upstream, its usage not yet reported
RUNNING = (INTERIM, SENT)
# What a request that went upstream and whose gateway then died is in the ledger when nothing of its usage
# was known: a UsageRecord's defaults, its sent line's fields, nothing counted, its cost unknown (NULL:
# counted apart, as unpriced), flagged interrupted.
_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(UsageRecord)
             if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
_USAGE_UNKNOWN = {"status": 0, "error_type": "gateway_stopped", "interrupted": True, "reached_upstream": True,
                  "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0, "duration_ms": 0.0, "cost": None,
                  "prices": {"unpriced": "usage unknown: the gateway stopped before the upstream answered"}}
SUFFIX = ".spool"           # rows as JSON objects
TUPLE_SUFFIX = ".spool2"    # a header naming the fields, then rows as JSON arrays (see the docstring)
SUFFIXES = (SUFFIX, TUPLE_SUFFIX)
FSYNC_MODES = ("always", "batch", "never")


OWNER_FILE = "database.owner"     # the directory's mark: which database its rows belong to (see the docstring)


class SpoolOfAnotherDatabase(ValueError):
    """The spool directory is marked as another database's: a gateway must not adopt its segments."""


def default_spool_dir(db: str) -> str:
    """Where a worker spools when `[ledger] spool_dir` is not set: beside a SQLite file; for a database
    URL (no file on this host) in the working directory (the URL may hold a password: never a path)."""
    url = parse(db)
    return "apertis-ledger.spool" if url.is_postgres else url.target + ".spool"


class Segment:
    """One spool file and the rows it holds: each as this worker appended it (a row object, shipped
    from memory and never parsed back) or as read from an adopted file (one JSON line, bytes).  A
    segment without a file (fd -1) holds rows in memory only, while the disk takes none."""

    __slots__ = ("path", "fd", "lines", "size", "fields", "written", "interims")

    def __init__(self, path: str, fd: int, lines: Optional[list] = None,
                 fields: Optional[RowFields] = None, written: int = 0, interims: Optional[list] = None) -> None:
        self.path, self.fd = path, fd
        self.fields = fields        # the header's field names: what an array line's values are
        self.lines: list[Any] = lines if lines is not None else []
        self.written = written      # bytes of whole lines in the file: where a torn write is cut back to
        self.interims = interims or []      # an adopted newest segment's interim lines (see the docstring)
        # What it holds to be shipped: its rows' bytes (and an adopted segment's interim lines).
        self.size = sum(len(line) for line in self.lines) + sum(len(line) for line in self.interims)

    @property
    def durable(self) -> bool:
        return self.fd >= 0

    def rows(self, log: logging.Logger, shape: Optional[LedgerRows] = None) -> list:
        """The rows to ship: those appended by this worker as they are; those read from the file parsed,
        and with `shape` (the ledger's: ledger_write.ledger_shape) only those the ledger can take, each
        other one logged whole and left out (a row lacking a value the ledger requires would fail every
        shipment of its segment, holding back every segment after it)."""
        out = []
        for line in self.lines:
            if type(line) is not bytes:
                out.append(line)
                continue
            row = self._parsed(line, log)
            if row is not None and (shape is None or self._fits(row, line, shape, log)):
                out.append(row)
        if self.interims:
            cut = self._cut_short(out, log)
            out += cut if shape is None else [row for row in cut if self._fits(row, None, shape, log)]
        return out

    def _fits(self, row: Any, line: Optional[bytes], shape: LedgerRows, log: logging.Logger) -> bool:
        fault = shape.fault(row)
        if fault is None:
            return True
        whole = line if line is not None else logged_row(row.as_dict() if type(row) is FieldValues else row)
        log.error("ledger spool %s: a row the ledger cannot take (%s) left out: %s", self.path, fault,
                  whole.decode(errors="replace").rstrip("\n") if isinstance(whole, bytes) else whole)
        return False

    def _parsed(self, line: bytes, log: logging.Logger) -> Any:
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            # Only a machine crash mid-write can leave a torn line.
            log.error("ledger spool %s: an unreadable line left out: %r", self.path, line[:200])
            return None
        if isinstance(row, dict):
            return row
        if isinstance(row, list) and self.fields is not None and len(row) == len(self.fields.names):
            return FieldValues(self.fields, tuple(row))
        log.error("ledger spool %s: a line of an unknown shape left out: %r", self.path, line[:200])
        return None

    def _cut_short(self, finished: list, log: logging.Logger) -> list:
        """The rows of requests this segment holds no final row of, cut short by the worker's death: each
        from its last interim line (the usage reported until then), or as sent with its usage unknown."""
        latest: dict[Any, Any] = {}         # request id -> its row; a later line replaces an earlier one
        for line in self.interims:
            row = self._running(line)
            if row is None:
                log.error("ledger spool %s: an interim line of an unknown shape left out: %r", self.path,
                          line[:200])
            else:
                latest[row.get("request_id")] = row
        done = {row.get("request_id") for row in finished}
        out = [row for request_id, row in latest.items() if request_id not in done]
        if out:
            unknown = sum(1 for row in out if type(row) is dict)
            log.warning("ledger spool %s: %d requests cut short by a stopped worker metered with the usage "
                        "reported until then (%d of them with none)", self.path, len(out), unknown)
        return out

    def _running(self, line: bytes) -> Any:
        """The row an interim or sent line stands for; None for a line of another shape."""
        try:
            tag, values = orjson.loads(line)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        if tag == "sent" and isinstance(values, dict) and isinstance(values.get("request_id"), str):
            row = {**_DEFAULTS, **values, **_USAGE_UNKNOWN}
            tried = row.get("attempt_log")
            row["attempt_log"] = [*(tried if isinstance(tried, list) else ()), stopped_attempt(
                row.get("channel_name"), row.get("channel_id"), None, None)]
            return row
        if tag == "interim" and self.fields is not None and isinstance(values, list) \
                and len(values) == len(self.fields.names):
            return FieldValues(self.fields, tuple(values))
        return None

    def release(self) -> None:
        """Delete the file (its rows are in the database), then let the lock go."""
        if not self.durable:
            return
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
        # Bytes waiting to be shipped: every segment's rows, and each running request's latest interim
        # line once (the copies carried into each new segment, and lines replaced since, are not counted).
        self.size = 0
        self.full = False
        self._warned = False
        self.write_errors = 0
        self.interims: dict[str, bytes] = {}    # request id -> interim line, of requests still running

    def open(self, database_id: Optional[str] = None, database: str = "") -> None:
        """Start this worker's first segment; with `database_id` (the identity of the database the rows go
        to, `database` its redacted name), after making sure the directory is that database's: marked so
        if it has no mark yet, SpoolOfAnotherDatabase if it is another's (see the module's docstring)."""
        # Rows name keys and client addresses: owner only, like the database file (segments are 0600).
        # A directory that exists keeps the mode its operator gave it.
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if database_id is not None:
            self._claim(database_id, database)
        self.current = self._new_segment()

    def _claim(self, database_id: str, database: str) -> None:
        path = os.path.join(self.directory, OWNER_FILE)
        mark = orjson.dumps({"database_id": database_id, "database": database}, option=orjson.OPT_APPEND_NEWLINE)
        temp = os.path.join(self.directory, f".{OWNER_FILE}-{secrets.token_hex(4)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _write_whole(fd, mark)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temp, path)         # never replaces a mark: of two workers marking it, one wins
                self.log.info("ledger spool %s marked as the spool of database %s", self.directory, database)
                return
            except FileExistsError:
                pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        with open(path, "rb") as f:
            found = f.read()
        try:
            owner = orjson.loads(found)
            owner_id, owner_name = owner["database_id"], owner.get("database") or "(unnamed)"
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise SpoolOfAnotherDatabase(
                f"ledger spool_dir {self.directory} has a mark ({OWNER_FILE}) that cannot be read: {found[:200]!r};"
                f" if the directory is this database's ({database}), remove the file; otherwise give each"
                f" database its own [ledger] spool_dir") from None
        if owner_id != database_id:
            raise SpoolOfAnotherDatabase(
                f"ledger spool_dir {self.directory} belongs to database {owner_name}, not to this gateway's"
                f" database {database}: its rows are not shipped here; give each database its own"
                f" [ledger] spool_dir")

    def _new_segment(self) -> Segment:
        """A fresh segment, the running requests' interim rows in it before it is named."""
        self._seq += 1
        suffix = TUPLE_SUFFIX if self._header else SUFFIX
        final = os.path.join(self.directory, f"{self._name}-{self._seq}{suffix}")
        temp = os.path.join(self.directory, f".{self._name}-{self._seq}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            start = self._header + b"".join(self.interims.values())
            _write_whole(fd, start)         # before the name: a segment is never seen without it
            os.rename(temp, final)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return Segment(final, fd, fields=self.fields, written=len(start))

    def _next_segment(self) -> Segment:
        """A fresh segment, or one in memory while the disk takes none (tried again at the next seal)."""
        try:
            seg = self._new_segment()
        except OSError as exc:
            self.write_errors += 1
            if self.current is None or self.current.durable:      # said once, not at every shipment
                self.log.error("ledger spool: no new segment in %s (%s): usage rows are held in memory only "
                               "until one can be written", self.directory, exc)
            return Segment("", -1, fields=self.fields)
        if self.current is not None and not self.current.durable:
            self.log.warning("ledger spool: usage rows are written to %s again", seg.path)
        return seg

    # -- request path ----------------------------------------------------------

    def append(self, line: bytes, row: Any = None) -> None:
        """Make one row durable (see the module's docstring); it also stays in memory, as `row` (what
        `line` encodes, in a form store.write_ledger takes) when given."""
        seg = self.current
        assert seg is not None
        seg.lines.append(line if row is None else row)
        seg.size += len(line)
        self._grew(len(line))
        self._write(seg, line, "a usage row is held in memory only", self.fsync == "always")

    def append_interim(self, request_id: str, line: bytes) -> None:
        """Make a running request's usage so far durable (`line` from interim_line()); its final row, or a
        later interim row of the same request, replaces it."""
        replaced = self.interims.get(request_id)
        self.interims[request_id] = line
        change = len(line) - (len(replaced) if replaced is not None else 0)
        if change >= 0:         # one change of size: a replaced line never flips `full` back and forth
            self._grew(change)
        else:
            self._shrank(-change)
        seg = self.current
        assert seg is not None
        # Never synced on its own (its request waits for no disk): it is there for a killed process, which
        # the page cache survives; the next sync takes it along.
        self._write(seg, line, "a running request's usage is held in memory only", False)

    def finished(self, request_id: str) -> None:
        """The request's final row was appended: its interim row no longer counts."""
        if self.interims:
            replaced = self.interims.pop(request_id, None)
            if replaced is not None:
                self._shrank(len(replaced))

    def _write(self, seg: Segment, line: bytes, lost: str, sync: bool) -> None:
        if not seg.durable:
            self.write_errors += 1
            return
        try:
            n = os.write(seg.fd, line)
            if n != len(line):              # a short write (disk full): the rest, or an OSError
                _write_whole(seg.fd, line[n:])
            seg.written += len(line)
            if sync:
                os.fsync(seg.fd)
        except OSError as exc:
            # Kept in memory and shipped from there; only its durability is lost, loudly.
            self.write_errors += 1
            self.log.error("ledger spool %s unwritable (%s): %s", seg.path, exc, lost)
            self._cut_back(seg)

    def _cut_back(self, seg: Segment) -> None:
        """After a torn write, end the file on its last whole line again, so the rows appended once the
        disk has room stay readable; if it cannot be, rows go to a new segment from now on."""
        try:
            os.ftruncate(seg.fd, seg.written)
            return
        except OSError as exc:
            self.log.error("ledger spool %s: a torn line cannot be cut back (%s); a new segment is started",
                           seg.path, exc)
        if seg is self.current:
            self.sealed.append(seg)
            self.current = self._next_segment()

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
        included when it holds rows and nothing older waits (new rows go to a
        fresh segment).  While shipping fails, rows gather in one segment, not
        in one per attempt each starting with the running requests' interim
        rows (copies that would count against `max_bytes`)."""
        seg = self.current
        if seg is not None and not self.sealed and (seg.lines or not seg.durable):
            if self.fsync == "batch" and seg.durable:
                try:
                    os.fsync(seg.fd)
                except OSError as exc:
                    self.log.error("ledger spool %s: fsync failed (%s)", seg.path, exc)
            if seg.lines:
                self.sealed.append(seg)         # (a memory-only segment without rows is just replaced)
            self.current = self._next_segment()
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
        parsed = {name: _worker_and_seq(name) for name in names}
        newest: dict[str, int] = {}         # each worker's newest segment: the one its interim rows count in
        for worker, seq in parsed.values():
            if worker is not None:
                newest[worker] = max(seq, newest.get(worker, seq))
        for name in names:
            path = os.path.join(self.directory, name)
            # A worker that died between creating a segment and naming it leaves
            # an empty temporary file; a young one may be a live worker's, mid-creation.
            leftover_temp = name.startswith(".ledger-") and name.endswith(".tmp") and _older_than(path, 60)
            if path in mine or not (name.endswith(SUFFIXES) or leftover_temp):
                continue
            worker, seq = parsed[name]
            seg = self._lock(path, interims=worker is not None and newest[worker] == seq)
            if seg is None:
                continue
            if leftover_temp:
                seg.release()
                continue
            self.sealed.append(seg)
            self._grew(seg.size)
            adopted += len(seg.lines) + len(seg.interims)
            if seg.lines or seg.interims:
                self.log.warning("adopted %d usage rows (and %d of requests then running) from the ledger "
                                 "spool of a stopped worker (%s)", len(seg.lines), len(seg.interims), name)
        return adopted

    @staticmethod
    def _lock(path: str, interims: bool = False) -> Optional[Segment]:
        """The segment at `path`, locked, if nobody holds it; with `interims`, its interim rows count."""
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
        fields, lines, interim_lines = parse_segment(data)
        return Segment(path, fd, lines, fields, written=len(data), interims=interim_lines if interims else None)

    def close(self) -> None:
        """Let go of every segment: empty ones are deleted, the others stay for
        whoever starts next (they are adopted then); so does the current one
        while requests still run (their interim rows are in it)."""
        for seg in [*self.sealed, *([self.current] if self.current else [])]:
            if not seg.durable:
                if seg.lines:
                    self.log.error("ledger spool: %d usage rows held in memory only are lost at shutdown",
                                   len(seg.lines))
            elif seg.lines or (seg is self.current and self.interims):
                os.close(seg.fd)
            else:
                seg.release()
        self.sealed = []
        self.current = None

    @property
    def pending(self) -> int:
        return sum(len(s.lines) for s in self.sealed) + (len(self.current.lines) if self.current else 0)


# orjson's bytes keep the whole buffer they were written into, 8 KiB at least however short the text: a line
# held in memory while its request runs is made a copy of its own length (the newline appended), a ninth of that.

def interim_line(values: Sequence) -> bytes:
    """The spool line of a running request's row `values` (see the module's docstring)."""
    try:
        return orjson.dumps(["interim", values]) + b"\n"
    except TypeError:       # a value orjson cannot write (an integer past 64 bits)
        return json.dumps(["interim", values], default=str, separators=(",", ":")).encode() + b"\n"


def sent_line(fields: dict) -> bytes:
    """The spool line of a request that is going upstream: `fields` of its row known so far (its usage is
    not); a stopped worker's adopter ships it as a row with its usage unknown."""
    return orjson.dumps(["sent", fields]) + b"\n"


def _worker_and_seq(name: str) -> tuple[Optional[str], int]:
    """(the worker, the sequence number) a segment's file name says; (None, 0) for other names."""
    if not name.endswith(SUFFIXES) or name.startswith("."):
        return None, 0
    worker, _, tail = name.rpartition("-")
    seq = tail.partition(".")[0]
    return (worker, int(seq)) if worker and seq.isdigit() else (None, 0)


def parse_segment(data: bytes) -> tuple[Optional[RowFields], list[bytes], list[bytes]]:
    """A segment file's content: the fields its header names (None without one), its row lines and
    its interim rows' lines."""
    lines = [line + b"\n" for line in data.split(b"\n") if line]
    interims = [line for line in lines if line.startswith(RUNNING)]
    if interims:
        lines = [line for line in lines if not line.startswith(RUNNING)]
    fields = None
    if lines and lines[0].startswith(b'{"fields":'):
        try:
            names = orjson.loads(lines[0])["fields"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            names = None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            fields = RowFields(names, names)      # values as spooled: each converted if it needs to be
            lines = lines[1:]
    return fields, lines, interims


def spooled_rows(directory: str) -> list[dict]:
    """Every finished request's row in the segment files under `directory`, oldest segment first, as
    field -> value (for inspection and tests; a segment deleted meanwhile is skipped)."""
    out: list[dict] = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIXES))
    except FileNotFoundError:
        return out
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                fields, lines, _ = parse_segment(f.read())
        except FileNotFoundError:
            continue
        seg = Segment(name, -1, lines, fields)
        out.extend(r.as_dict() if isinstance(r, FieldValues) else r for r in seg.rows(logging.getLogger(__name__)))
    return out


def _write_whole(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a short write is followed by the rest, or an OSError)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except FileNotFoundError:
        return False
