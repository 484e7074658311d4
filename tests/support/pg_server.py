"""A throwaway PostgreSQL server for the tests: initdb into a temporary directory,
listening only on a unix socket in that directory (no TCP port, so no port races).

initdb refuses to run as root: as root the server runs as an unprivileged system
user (`postgres` when it exists, else `nobody`) through setpriv.

    server = PgServer.start()          # raises PgUnavailable when there is no initdb
    PgServer.start(parent=memory_folder())   # its files in /dev/shm where there is one
    url = server.create_database("t1") # postgresql://USER@/t1?host=SOCKETDIR
    server.stop(); server.start_again() # the database down and up again (same data)
    PgServer.start(durable=True)        # commits survive a crash (stop("immediate"))
    server.close()
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Optional

SUPERUSER = "apertis"
SHM = "/dev/shm"


class PgUnavailable(RuntimeError):
    pass


def find_bindir() -> Optional[str]:
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return os.path.dirname(initdb)
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


# The suite's servers and temporary folders hold some GB at most; a smaller /dev/shm (a container's 64 MB) is
# not used.
SHM_FREE_BYTES = 4 << 30


def memory_folder() -> Optional[str]:
    """/dev/shm where it is a writable folder (a tmpfs on Linux) with SHM_FREE_BYTES free, else None: files
    quicker to write and to remove than on a disk that discards freed blocks at once (as here), e.g. a server
    holding many databases."""
    try:
        if not os.access(SHM, os.W_OK):
            return None
        stat = os.statvfs(SHM)
    except OSError:
        return None
    return SHM if stat.f_bavail * stat.f_frsize >= SHM_FREE_BYTES else None


def _run_as() -> list[str]:
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    raise PgUnavailable("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


class PgServer:
    def __init__(self, bindir: str, root: str, durable: bool = False) -> None:
        self.durable = durable
        self.bindir = bindir
        self.root = root
        self.data = os.path.join(root, "data")
        self.socket_dir = os.path.join(root, "sock")
        self.prefix = _run_as()

    @classmethod
    def start(cls, durable: bool = False, parent: Optional[str] = None) -> "PgServer":
        """`durable`: fsync and synchronous commits on, so a commit survives the server's crash (tests that
        stop it with "immediate"); off by default, for speed.  `parent`: the folder to make the server's
        temporary directory in (default: the system's temporary folder)."""
        bindir = find_bindir()
        if bindir is None:
            raise PgUnavailable("PostgreSQL's initdb is not installed (Debian: apt-get install postgresql)")
        root = tempfile.mkdtemp(prefix="apertis-pg-", dir=parent)
        os.chmod(root, 0o755)
        server = cls(bindir, root, durable)
        os.makedirs(server.socket_dir)
        if server.prefix:
            uid = int(server.prefix[1].split("=")[1])
            gid = int(server.prefix[2].split("=")[1])
            os.chown(root, uid, gid)
            os.chown(server.socket_dir, uid, gid)
        server._run("initdb", "-D", server.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                    "--no-sync", "--locale=C")
        server.start_again()
        return server

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self.prefix, os.path.join(self.bindir, tool), *args],
                                capture_output=True, text=True, cwd=self.root)
        if result.returncode != 0:
            raise PgUnavailable(f"{tool} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start_again(self) -> None:
        options = f"-k {self.socket_dir} -c listen_addresses='' -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l", os.path.join(self.root, "log"),
                  "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        self._psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _psql(self, sql: str) -> None:
        result = subprocess.run([os.path.join(self.bindir, "psql"), "-h", self.socket_dir, "-U", SUPERUSER,
                                 "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)

    def close(self) -> None:
        try:
            self.stop("immediate")
        except PgUnavailable:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

