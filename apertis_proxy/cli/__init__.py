"""The operator command line: `apertis-proxy serve|keys|channels|prices|usage|db`.

One module per noun, each command's flags beside its handler; the SQL lives in
`store/`.  Every edit goes straight to the store, where triggers bump the
config revision that a running server polls, so no restart is needed.
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Optional, Sequence

from .. import __version__
from ..plugin_host import PluginLoadError
from ..store import service as store_service
from . import channels, db, keys, prices, serve, usage
from .commands import Commands
from .database import DEFAULT_DB, redacted
from .output import err
from .values import parse_budget, parse_quota, parse_time

__all__ = ["build_parser", "main", "parse_budget", "parse_quota", "parse_time"]


def build_parser() -> argparse.ArgumentParser:
    # --db may come at any level; SUPPRESS keeps an inner default from hiding an outer value.
    db_parent = argparse.ArgumentParser(add_help=False)
    db_parent.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                           help="a SQLite database path or a postgresql:// URL"
                                f" (default: env APERTIS_DB or {DEFAULT_DB})")

    parser = argparse.ArgumentParser(
        prog="apertis-proxy", parents=[db_parent], allow_abbrev=False,
        description="Self-hosted gateway for the Anthropic Messages API.")
    parser.add_argument("--version", action="version", version=f"apertis-proxy {__version__}")
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), db_parent)
    for noun in (serve, keys, channels, prices, db, usage):
        noun.add_commands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:      # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except OverflowError as exc:   # a number past what the store holds (values.py)
        err(str(exc))
        return 2
    try:
        return args.handler(args)
    except argparse.ArgumentTypeError as exc:
        return _failed(args, str(exc), 2)
    except OverflowError:          # an integer past what SQLite stores
        return _failed(args, "a number given is too large", 2)
    except (ValueError, LookupError, OSError, sqlite3.Error, PluginLoadError, store_service.StoreUnavailable,
            store_service.NewerSchemaError) as exc:
        return _failed(args, redacted(args, str(exc)), 1)
    except _driver_errors() as exc:
        return _failed(args, redacted(args, f"the database refused it: {exc}"), 1)
    except KeyboardInterrupt:
        return 130


def _failed(args, message: str, code: int) -> int:
    """Say why the command failed, in one line: in the log's format once `serve` read it
    (cmd_serve sets args.log_format)."""
    err(message, getattr(args, "log_format", "text"))
    return code


def _driver_errors() -> tuple[type[BaseException], ...]:
    """The PostgreSQL driver's errors, when it was loaded (it is optional: SQLite needs none)."""
    asyncpg = sys.modules.get("asyncpg")
    return (asyncpg.PostgresError, asyncpg.InterfaceError) if asyncpg is not None else ()


if __name__ == "__main__":
    sys.exit(main())
