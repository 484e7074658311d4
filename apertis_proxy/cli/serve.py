"""`apertis-proxy serve`: check the store, then run the gateway."""
from __future__ import annotations

import logging
import os
import shlex
import sys

from .. import settings as settings_module
from ..observe import logs
from ..store import channels as channel_store
from ..store import dbfile, key_encryption
from ..store import keys as key_store
from ..store.url import parse as parse_db_url
from . import values
from .channels import no_channel_help
from .commands import Commands
from .database import command_line, open_path


def serve_flags(p) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=values.port, help="port to listen on (default 8080)")
    p.add_argument("--workers", type=values.positive_int, help="worker processes sharing the port")
    p.add_argument("--config", metavar="FILE", help="TOML settings file (default: env APERTIS_CONFIG)")
    p.add_argument("--log-level", type=str.upper, choices=settings_module.LOG_LEVELS)


def cmd_serve(args) -> int:
    overrides = {k: getattr(args, k) for k in ("host", "port", "workers", "log_level")
                 if getattr(args, k) is not None}
    if getattr(args, "db", None):
        overrides["db"] = args.db
    settings = settings_module.load(args.config, **overrides)
    args.log_format = settings.log_format      # how cli.main says why serve stopped

    def say(message: str, level: int = logging.INFO) -> None:
        """A start-up hint (stdout) or warning (stderr); with [logging] format = "json", one line shaped like
        the log's so every line the process writes parses."""
        if settings.log_format == "json":
            message = logs.json_line(level, "apertis_proxy.serve", message)
        print(message, file=sys.stderr if level >= logging.WARNING else sys.stdout, flush=True)

    with open_path(settings.db) as conn:   # creates or migrates the schema before workers start
        if not parse_db_url(settings.db).is_postgres and dbfile.readable_by_others(settings.db):
            say(f"warning: {settings.db} holds upstream keys and other users may read it;"
                f" restrict it with: chmod 600 {shlex.quote(settings.db)}", logging.WARNING)
        created = channel_store.bootstrap_default_channel(conn, os.environ)
        if created:
            say(created)
        _check_key_storage(conn, say)
        _check_channel_urls(conn, say)
        if channel_store.channel_count(conn) == 0:
            say(no_channel_help(settings.db))
        elif not key_store.list_keys(conn):
            create = command_line(settings.db, "keys", "create", "NAME")
            say(f"no user key exists yet; create one with:\n  {create}")
    from ..server import run   # imported late: the CLI's other commands do not need the server
    return int(run(settings) or 0)


def _check_key_storage(conn, say) -> None:
    """Refuse to serve channels whose keys cannot be opened; point out plain-text ones."""
    storage = channel_store.key_storage(conn)
    box = key_encryption.from_environment()
    sealed = [c["name"] for c in storage if c["storage"] == "encrypted" and c["opens"] is not True]
    if sealed:
        raise key_encryption.SecretKeyError(
            f"the upstream keys of channel(s) {', '.join(sealed)} are encrypted and "
            + ("no key in" if box is not None else "not set:") + f" {key_encryption.ENV_KEY}"
            + (" opens them" if box is not None else ""))
    plain = [c["name"] for c in storage if c["storage"] == "plain text"]
    if box is not None and plain:
        say(f"warning: the upstream keys of channel(s) {', '.join(plain)} are stored in plain text;"
            " encrypt them with: apertis-proxy db reencrypt", logging.WARNING)


def _check_channel_urls(conn, say) -> None:
    """One warning for channels stored (by an older version) with a user name or password in the base URL:
    the gateway connects to the host alone and never sends them."""
    stored = [(row["name"], row["base_url"]) for row in conn.execute("SELECT name, base_url FROM channels ORDER BY id")
              if channel_store.has_userinfo(row["base_url"])]
    if stored:
        listed = ", ".join(f"{name} ({channel_store.redact_base_url(url)})" for name, url in stored)
        say(f"warning: the base URL of channel(s) {listed} carries a user name or password, which is not sent "
            "upstream; remove it with: apertis-proxy channels set NAME --base-url URL (the credential goes in "
            "--api-key)", logging.WARNING)


def add_commands(commands: Commands) -> None:
    commands.add("serve", cmd_serve, "run the gateway", serve_flags)
