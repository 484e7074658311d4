"""Server lifecycle: start a worker, serve, shut down gracefully.

`Gateway` is one worker's whole stack (plugins, pools, catalogue watcher,
listening socket) and is what tests start in-process on port 0.  `run()` is
the blocking entry point of `apertis-proxy serve`.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sqlite3
from typing import Optional

from .errors import render_error
from .fd_limits import connection_cap, raise_nofile_limit
from .gateway.client_address import ClientAddress
from .gateway.forward import CatalogRef, MessagesForwarder
from .gateway.pipeline import GatewayApp
from .http.protocol import HttpConnection, ServerState
from .listener import Listener, bind_sockets, ensure_port_free
from .observe import logs as log_setup
from .observe import shared as metrics_share
from .observe.app import Observability, ObservedApp, run_dir_for
from .plugin_host import PluginHost, PluginLoadError, check_names
from .settings import Settings
from .store.catalog import Catalog
from .store.owned_state import OwnedState
from .store.retention import LedgerRetention
from .store.service import NewerSchemaError, Store, StoreUnavailable, open_store
from .store.url import parse as parse_db_url
from .supervisor import supervise
from .tls import ServerCertificate
from .upstream.connection import UpstreamConnection
from .upstream.pool import Pools

log = logging.getLogger("apertis_proxy.server")


class Gateway:
    def __init__(self, settings: Settings, *, worker: int = 0, workers: int = 1) -> None:
        self.settings = settings
        self.worker = worker
        self.workers = workers
        self.state = ServerState(render_error, settings.max_connections)
        self.pools = Pools(max_idle=settings.pool_max_idle, idle_timeout=settings.pool_idle_timeout,
                           connect_timeout=settings.connect_timeout)
        self.plugins: Optional[PluginHost] = None
        self.observe: Optional[Observability] = None
        self._observe_running = False
        self._listener: Optional[Listener] = None
        self.store: Optional[Store] = None
        self.owned: Optional[OwnedState] = None
        self.retention: Optional[LedgerRetention] = None
        self.certificate: Optional[ServerCertificate] = None
        self.host = settings.host
        self.port = settings.port

    async def start(self, sock: Optional[socket.socket] = None) -> None:
        """Bind (or take `sock`, bound), start the store, plugins and watcher, then listen and accept."""
        s = self.settings
        self.state.max_connections = connection_cap(s.max_connections, raise_nofile_limit())
        # The upstream connections' switches are per process (client connections read the settings).
        UpstreamConnection.fast_heads = s.fast_heads
        UpstreamConnection.fast_heads_check = s.fast_heads_check
        if self.state.max_connections < s.max_connections and self.worker == 0:
            log.info("client connections capped at %d per worker (max_connections %d) to fit the open file limit",
                     self.state.max_connections, s.max_connections)
        if s.tls_cert and s.tls_key:
            self.certificate = ServerCertificate(s.tls_cert, s.tls_key)
        # Bind first: a port in use fails at once, before plugins and the
        # watcher hold threads that would keep the process alive.  Listening
        # starts only once everything is up (see Listener.start).
        sockets = [sock] if sock is not None else bind_sockets(s.host, s.port, reuse_port=self.workers > 1)
        try:
            app = await self._start_app()
        except BaseException:
            for listening in sockets:
                listening.close()
            raise
        state = self.state

        def factory() -> HttpConnection:
            return HttpConnection(app, s, state)

        loop = asyncio.get_running_loop()

        def may_handshake(handshakes: int) -> bool:
            """A TLS handshake counts against the connection cap from its first byte.  One past the cap is
            closed before its handshake (no 503 can be sent): counted as a refusal with code 0."""
            if len(state.connections) + handshakes < state.max_connections or state.make_room(loop.time()):
                return True
            recorder = self.observe.recorder if self.observe is not None else None
            if recorder is not None:
                recorder.refused("connection_cap", 0)
            return False

        self._listener = Listener(sockets, factory, loop, tls=self.certificate, may_handshake=may_handshake,
                                  handshake_timeout=s.header_timeout)
        try:
            self._listener.start()      # listen() can still find the port taken (another server's race)
        except BaseException:
            self._listener.close()
            await self._stop_app()
            raise
        name = sockets[0].getsockname()
        self.host, self.port = name[0], name[1]

    async def _start_app(self) -> ObservedApp:
        s = self.settings
        catalog = CatalogRef(Catalog())
        # Creates or upgrades the schema; one change watcher feeds the core and every plugin.
        self.store = await open_store(s.db)
        try:
            self.plugins = PluginHost.load(s, worker=self.worker, workers=self.workers, store=self.store)
            watcher = self.store.watcher(s.config_poll_interval)
            await watcher.start()
            watcher.subscribe(lambda snapshot: setattr(catalog, "catalog", snapshot.catalog))
            await self.plugins.start()
        except BaseException:
            await self._stop_app()
            raise
        self.owned = OwnedState(self.store)
        if s.keep_days > 0 and self.worker == 0:    # one process prunes for all
            self.retention = LedgerRetention(self.store, s.keep_days, log)
            self.retention.start()
        self.observe = Observability(s, self.plugins, catalog, self.store, run_dir=run_dir_for(self.workers))
        if self.observe.recorder is not None:
            self.plugins.observer = self.observe.recorder
        self.state.refused = self.observe.refusal_hook
        self.observe.start()
        self._observe_running = True
        client_address = ClientAddress(s.trusted_proxies, s.forwarded_header) if s.trusted_proxies else None
        if client_address is not None:
            self.state.client_of = client_address.resolve
        app = GatewayApp(MessagesForwarder(s, self.plugins, self.pools, catalog, self.owned), self.plugins,
                         client_address)
        return self.observe.wrap(app)

    async def _stop_app(self) -> None:
        """Let go of what _start_app started (their threads would keep the process alive), in order: the
        meters flush (plugins) before the metrics close, so that their last rows are counted, and ownership
        records still being written settle before the store closes.  Once: a shutdown() after a failed start
        finds nothing left to close.  `observe` stays readable after it closed."""
        retention, plugins, owned, store = self.retention, self.plugins, self.owned, self.store
        observe, self._observe_running = (self.observe if self._observe_running else None), False
        self.retention = self.plugins = self.owned = self.store = None
        if retention is not None:
            await retention.close()
        if plugins is not None:
            await plugins.close()
        if observe is not None:
            await observe.close()
        if owned is not None:
            await owned.settle()
        if store is not None:
            await store.close()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.certificate else 'http'}://{self.host}:{self.port}"

    def reload_certificate(self) -> None:
        """SIGHUP: new connections get the certificate now in the files."""
        if self.certificate is not None:
            self.certificate.reload()

    async def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, let in-flight requests finish up to `timeout`, then close."""
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        if self.observe is not None:
            # /ready says 503 at once; serving goes on for drain_delay so that
            # load balancers stop sending before the port closes.
            self.observe.readiness.draining = True
            if self.settings.drain_delay > 0:
                await asyncio.sleep(self.settings.drain_delay)
        self.state.draining = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.state.connections):
            conn.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Handler tasks, not connections: a handler meters its request after
        # the last byte went out and its connection closed.
        while self.state.tasks and loop.time() < deadline:
            await asyncio.wait(set(self.state.tasks), timeout=deadline - loop.time())
            # A task leaves the set from its own code; one cancelled before it
            # ever ran never does.
            self.state.tasks.difference_update([t for t in self.state.tasks if t.done()])
        # Past the deadline.  Cancel the handlers while their clients are still
        # connected: a stream cut here tells its client so in-band (an error
        # event) before the connection closes, and each handler releases its
        # upstream and meters the request (interrupted) on the way out.
        pending = set(self.state.tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.state.connections):
            conn.close()
        await self._stop_app()
        self.pools.close()


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(settings: Settings, worker: int, workers: int) -> int:
    gw = Gateway(settings, worker=worker, workers=workers)
    await gw.start()
    # Everything loaded so far lives as long as the process: keep it out of the
    # cyclic collector's scans, and collect less often (request objects are
    # short-lived and freed by reference counting; measured ~2% of CPU in GC).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    if worker == 0:
        log.info("apertis-proxy listening on %s (workers: %d, db: %s)", gw.base_url, workers,
                 gw.store.redacted_url if gw.store else parse_db_url(settings.db).redacted())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gw.reload_certificate)
    await stop.wait()
    log.info("worker %d shutting down (grace %.0fs)", worker, settings.shutdown_timeout)
    await gw.shutdown()
    return 0


def _run_worker(settings: Settings, worker: int, workers: int) -> int:
    _install_loop()
    return asyncio.run(_serve(settings, worker, workers))


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT: in this process, or with workers > 1 in
    forked workers the parent looks after (supervisor.py)."""
    log_setup.configure(settings.log_level, settings.log_format)
    check_names(settings)      # a bad plugin name: one clear error, not one per worker
    # SIGHUP would end a process whose loop does not handle it yet (it reloads TLS).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if settings.workers <= 1:
        return _run_worker(settings, 0, 1)
    # The workers share the port with SO_REUSEPORT, which would as well share it with another
    # multi-worker server already there (the kernel splitting clients between two gateways): a
    # port in use fails here, once, as with one worker.  A worker replaced later binds beside
    # its siblings.
    ensure_port_free(settings.host, settings.port)
    reserved = _pick_shared_port(settings)
    if reserved:
        settings = settings.replace(port=reserved[0].getsockname()[1])
    run_dir = os.environ[metrics_share.RUN_DIR_ENV] = metrics_share.create_run_dir()
    try:
        return supervise(settings.workers, lambda index: _worker_life(settings, index),
                         lambda pid: metrics_share.mark_dead(run_dir, pid))
    finally:
        metrics_share.remove_run_dir(run_dir)
        for sock in reserved:
            sock.close()


def _pick_shared_port(settings: Settings) -> list[socket.socket]:
    """For port 0 (any free port): the port every worker joins, picked once here, where each worker
    would pick a port of its own.  The sockets returned hold it (bound with SO_REUSEPORT, never
    listening, so they take no connections) while the workers run; none for a given port."""
    if settings.port != 0:
        return []
    return bind_sockets(settings.host, 0, reuse_port=True)


def _worker_life(settings: Settings, index: int) -> int:
    """A forked worker's whole life; its exit code.  It reports its own failure:
    os._exit() leaves no interpreter to print one."""
    try:
        return _run_worker(settings, index, settings.workers)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, LookupError, sqlite3.Error, PluginLoadError, StoreUnavailable,
            NewerSchemaError) as exc:
        log.error("worker %d: %s", index, exc)
    except BaseException:  # noqa: BLE001 - the last word of a process
        log.exception("worker %d failed", index)
    return 1
