"""File descriptors: the process's limit, and how many client connections it leaves room for.

Every client connection is one descriptor, and one in flight holds a second, its
upstream socket (idle upstream connections in the pools are at most as many as
were busy at once).  With the common soft limit of 1,024, about a thousand idle
client connections used to lock everyone out (accept fails with EMFILE).  The
soft limit is raised to the hard one at start, and the client connections are
capped at half of what is left after a reserve for the store, logs and plugins.
"""
from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

log = logging.getLogger("apertis_proxy.server")

# Descriptors kept for everything that is not a connection: SQLite files and
# their WAL, the listening sockets, logs, plugin threads, the event loop's own.
RESERVED = 64
MIN_CONNECTIONS = 16


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force
    (0 where it cannot be known: no cap is derived from it then)."""
    if resource is None:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit from %d to %d: %s", soft, hard, exc)
    return 0 if soft == resource.RLIM_INFINITY else soft


def connection_cap(configured: int, nofile: int) -> int:
    """The client connection cap: `configured`, lowered so that each connection
    can also hold an upstream socket within `nofile` descriptors."""
    if nofile <= 0:
        return configured
    return min(configured, max(MIN_CONNECTIONS, (nofile - RESERVED) // 2))
