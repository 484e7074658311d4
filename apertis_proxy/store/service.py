"""The store as one service: ``Store`` owns the backend's connection and offers
named operations; ``open_store(url)`` picks the backend from the URL (url.py).

Operations are plain functions of a connection (keys.py, channels.py, config.py,
spend.py, owned_state.py, usage.py), written once for both backends: SQLite
through ``sqlite3``, PostgreSQL through ``PgConnection`` (pg_connection.py).  The
Store runs them on its own thread, one at a time, so the event loop never waits
on the database; the CLI calls the same functions on a connection from
``connect()``.

A PostgreSQL connection that is lost is dropped and opened again on the next
operation; meanwhile every operation raises ``StoreUnavailable``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from . import config as config_ops
from . import channel_health, dbfile, schema, spend
from .ledger_write import LedgerUnavailable, shipped_and_spend, write_ledger_rows
from .url import StoreURL, parse

log = logging.getLogger("apertis_proxy.store")

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The database cannot be reached (message without a password)."""


class NewerSchemaError(Exception):
    """The database's schema is newer than this version understands."""


def _postgres_errors() -> tuple:
    import asyncpg
    return (OSError, asyncio.TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.exceptions.InterfaceError, asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.ConnectionFailureError, asyncpg.exceptions.InvalidCatalogNameError,
            asyncpg.exceptions.InvalidAuthorizationSpecificationError,
            asyncpg.exceptions.InvalidPasswordError, asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.CrashShutdownError)


def connect(url: StoreURL | str, *, create: bool = True):
    """A migrated connection (sqlite3 or PgConnection) to the store at `url`.

    `create=False` refuses a SQLite file that is not there (dbfile.MissingDatabase).
    Raises StoreUnavailable for a database that cannot be reached and
    NewerSchemaError for a schema newer than this version's."""
    url = parse(url) if isinstance(url, str) else url
    if not url.is_postgres:
        if not create:
            dbfile.require_existing(url.target)
        conn = schema.connect(url.target)
        version = schema.schema_version(conn)
        if version > schema.SCHEMA_VERSION:
            conn.close()
            raise NewerSchemaError(_newer(version))
        return conn
    try:
        import asyncpg  # noqa: F401 - the extra
    except ImportError:
        raise StoreUnavailable("a postgresql:// database needs asyncpg: pip install 'apertis-proxy[postgres]'"
                               ) from None
    from . import pg_schema
    from .catalog import sync_shipped_catalog
    from .pg_connection import PgConnection
    try:
        conn = PgConnection(url)
    except _postgres_errors() as exc:
        raise StoreUnavailable(f"cannot reach the database at {url.redacted()}: "
                               f"{url.scrub(str(exc)) or type(exc).__name__}") from None
    try:
        conn.run(pg_schema.migrate(conn.raw))
        # The shipped catalogue is loaded under the migration lock: two hosts starting
        # together import it once.
        conn.run(conn.raw.execute("SELECT pg_advisory_lock($1)", pg_schema.MIGRATION_LOCK))
        try:
            sync_shipped_catalog(conn)
        finally:
            conn.run(conn.raw.execute("SELECT pg_advisory_unlock($1)", pg_schema.MIGRATION_LOCK))
    except pg_schema.NewerSchema as exc:
        conn.close()
        raise NewerSchemaError(str(exc)) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _newer(version: int) -> str:
    return (f"the database's schema is version {version}, newer than this apertis-proxy understands "
            f"({schema.SCHEMA_VERSION}): upgrade apertis-proxy")


def is_unreachable(exc: BaseException) -> bool:
    """True for an error that says the database is not there or takes no writes now (as opposed to a
    bad statement or row)."""
    if isinstance(exc, (StoreUnavailable, LedgerUnavailable)):
        return True
    try:
        return isinstance(exc, _postgres_errors())
    except ImportError:
        return False


class Store:
    """One backend connection and the named operations on it (see the module docstring)."""

    def __init__(self, url: StoreURL) -> None:
        self.url = url
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="apertis-store")
        self._conn: Any = None
        self._ledger: Any = None
        self._watcher: Any = None
        self._closed = False

    @property
    def backend(self) -> str:
        return self.url.kind

    @property
    def redacted_url(self) -> str:
        return self.url.redacted()

    # -- running operations --------------------------------------------------------

    def _connection(self):
        if self._conn is None:
            self._conn = connect(self.url)
        return self._conn

    def _invoke(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        conn = self._connection()
        try:
            return fn(conn, *args, **kwargs)
        except BaseException as exc:
            if self.url.is_postgres and is_unreachable(exc):
                self._drop()
                raise StoreUnavailable(f"database {self.url.redacted()} unreachable: "
                                       f"{self.url.scrub(str(exc)) or type(exc).__name__}") from None
            if self.url.is_postgres and getattr(conn, "in_transaction", False):
                try:
                    conn.rollback()
                except Exception:
                    self._drop()
            raise

    def _drop(self) -> None:
        conn, self._conn, self._ledger = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(connection, *args, **kwargs)` on the store's thread."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._invoke, fn, args, kwargs)

    async def open(self) -> "Store":
        """Connect (creating or upgrading the schema) now, so errors show at start-up."""
        await self.call(lambda conn: None)
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            await self._watcher.close()
            self._watcher = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._drop)
        self._executor.shutdown(wait=True)

    async def admissions(self):
        """This process's access to the admissions of limited keys (admissions.py), opened, used from
        the calling event loop: on PostgreSQL connections of its own through asyncpg
        (pg_admissions.py), on SQLite a connection of its own with group commit."""
        if not self.url.is_postgres:
            from .admissions import SqliteAdmissions
            return await SqliteAdmissions(self.url.target).open()
        from .pg_admissions import PgAdmissions
        try:
            return await PgAdmissions(self.url).open()
        except _postgres_errors() as exc:
            raise StoreUnavailable(f"cannot reach the database at {self.url.redacted()}: "
                                   f"{self.url.scrub(str(exc)) or type(exc).__name__}") from None

    async def database_id(self) -> str:
        """The database's identity (schema.DATABASE_ID): what a ledger spool directory is marked with."""
        return await self.call(schema.ensure_database_id)

    # -- the configuration ---------------------------------------------------------

    def watcher(self, interval: Optional[float] = None):
        """This store's one change watcher (changes.py), created on first use (polling every second
        unless told).  It polls at the smallest `interval` any caller asks for."""
        if self._watcher is None:
            from .changes import ChangeWatcher
            self._watcher = ChangeWatcher(self, 1.0 if interval is None else interval)
        elif interval is not None:
            self._watcher.poll_within(interval)
        return self._watcher

    async def read_config(self) -> "config_ops.ConfigSnapshot":
        return await self.call(config_ops.read_config)

    async def config_rev(self) -> int:
        return await self.call(config_ops.read_rev)

    async def disable_channel(self, channel_id: int, reason: str, at: float) -> bool:
        """Disable an enabled channel with `reason` (the first reason stays)."""
        return await self.call(config_ops.disable_channel, channel_id, reason, at)

    async def write_channel_health(self, worker: str, rows) -> None:
        """Store this worker's view of the channels' health (channel_health.py)."""
        await self.call(channel_health.write_rows, worker, rows)

    async def end_channel_cooldowns(self, worker: str) -> None:
        """A worker starting: its earlier rows keep their counts, not their cooldowns."""
        await self.call(channel_health.end_cooldowns, worker)

    async def channel_states(self) -> list[tuple[str, bool]]:
        """(name, enabled) of every channel.  On SQLite through a fresh read-only connection,
        so a database file that was removed or replaced shows (an open one would not)."""
        if self.url.is_postgres:
            return await self.call(config_ops.channel_states)
        return await asyncio.to_thread(_sqlite_channel_states, self.url.target)

    # -- spend and ledger ----------------------------------------------------------

    async def settle_spend(self, deltas: Sequence[tuple[int, float, int]],
                           period_deltas: Sequence[tuple[int, str, str, float, int]] = (),
                           starts: Optional[Mapping[str, str]] = None):
        """Add (key id, cost, tokens) amounts (and per quota period); every key's settled spend and its
        spend in the periods starting at `starts` (spend.py)."""
        return await self.call(spend.settle_spend, deltas, period_deltas, starts)

    async def read_spend(self) -> dict[int, tuple[float, int]]:
        return await self.call(spend.read_spend)

    async def write_ledger(self, rows: Sequence[Mapping[str, Any]], rejected: Optional[list[str]] = None) -> int:
        """Insert the ledger rows (UsageRecord field -> value) not yet there, their spend settled in the
        same transaction; the number inserted (ledger_write.py).  Refused rows' ids go to `rejected`."""
        return await self.call(self._write_ledger, rows, rejected)

    async def ledger_shape(self):
        """The ledger's columns and what a row needs (ledger_write.LedgerRows), read once per store."""
        return (await self.call(self._ledger_parts))[0]

    def _write_ledger(self, conn, rows, rejected) -> int:
        shape, pg_ledger = self._ledger_parts(conn)
        return write_ledger_rows(conn, rows, shape, rejected, pg_ledger=pg_ledger)

    def _ledger_parts(self, conn):
        if self._ledger is None:
            from .ledger_write import ledger_shape
            from .pg_ledger import PgLedger
            self._ledger = (ledger_shape(conn), PgLedger() if self.url.is_postgres else None)
        return self._ledger

    async def shipped_and_spend(self, request_ids: Sequence[str], starts: Optional[Mapping[str, str]] = None):
        """Which of these request ids the ledger holds, every key's settled spend and its spend in the
        periods starting at `starts`, read in one transaction (ledger_write.py)."""
        return await self.call(shipped_and_spend, request_ids, starts)

    async def prune_ledger(self, cutoff: float, batch_rows: int = 500) -> int:
        """Remove ledger rows older than `cutoff` (unix time); the number removed."""
        if self.url.is_postgres:
            from .pg_ledger import prune
            return await self.call(lambda conn: conn.run(prune(conn.raw, cutoff)))
        return await self.call(_sqlite_prune_batch, cutoff, batch_rows)


def _sqlite_channel_states(path: str) -> list[tuple[str, bool]]:
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=2.0)
    try:
        return config_ops.channel_states(conn)
    finally:
        conn.close()


_DELETE_BATCH = ("DELETE FROM usage WHERE id IN"
                 " (SELECT id FROM usage WHERE ts < ? ORDER BY ts LIMIT ?)")


def _sqlite_prune_batch(conn, cutoff: float, batch_rows: int) -> int:
    return conn.execute(_DELETE_BATCH, (cutoff, batch_rows)).rowcount


async def open_store(url: str) -> Store:
    """A connected Store for `url` (a path, sqlite:///path or postgresql://...), its schema current."""
    store = Store(parse(url))
    try:
        await store.open()
    except BaseException:
        await store.close()
        raise
    return store


async def store_for_plugin(ctx) -> tuple[Store, bool]:
    """The gateway's store from a PluginContext, or (outside a gateway, e.g. in tests) one
    opened on ctx.db_path; the flag says whether the caller opened it and must close it."""
    if getattr(ctx, "store", None) is not None:
        return ctx.store, False
    return await open_store(ctx.db_path), True
