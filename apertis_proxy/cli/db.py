"""`apertis-proxy db ...`: backups, copies between stores, upstream key encryption."""
from __future__ import annotations

import os

from ..store import channels as channel_store
from ..store import dbfile, key_encryption
from ..store.url import parse as parse_db_url
from .commands import Commands
from .database import db_path, open_path, open_store
from .output import table


def backup_flags(p) -> None:
    p.add_argument("file", metavar="FILE", help="a new file (an existing one is not overwritten)")


def cmd_db_backup(args) -> int:
    if parse_db_url(db_path(args)).is_postgres:
        raise ValueError("db backup copies a SQLite file; back a PostgreSQL database up with pg_dump")
    with open_store(args) as conn:
        size = dbfile.backup(conn, args.file)
    print(f"backed up {os.path.abspath(db_path(args))} to {args.file} ({size:,} bytes)")
    return 0


def copy_flags(p) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="DB",
                   help="the database to copy from (a file path, sqlite:///path or postgresql://...)")
    p.add_argument("--to", dest="target", required=True, metavar="DB",
                   help="the database to copy into (created or upgraded as needed)")


def cmd_db_copy(args) -> int:
    from ..store.copy import copy_store
    source_url, target_url = parse_db_url(args.source), parse_db_url(args.target)
    if source_url == target_url:
        raise ValueError("--from and --to name the same database")
    with open_path(args.source, create=False) as source, open_path(args.target) as target:
        counts = copy_store(source, target)
    print(f"copied {source_url.redacted()} to {target_url.redacted()}: "
          + ", ".join(f"{table} {count:,}" for table, count in counts.items())
          + " (rows new to the target, for models and model_prices new or changed; a second run copies"
            " nothing twice)")
    return 0


def cmd_db_secret_key(args) -> int:
    print(key_encryption.new_secret_key())
    return 0


def cmd_db_secrets(args) -> int:
    with open_store(args) as conn:
        storage = channel_store.key_storage(conn)
    box = key_encryption.from_environment()
    opens = {True: "yes", False: "NO", None: "-"}
    print(table(("CHANNEL", "KEY STORED", "OPENS WITH THE SECRET KEY"),
                [(c["name"], c["storage"], opens[c["opens"]]) for c in storage]))
    plain = sum(c["storage"] == "plain text" for c in storage)
    if box is None:
        print(f"no secret key configured ({key_encryption.ENV_KEY} or {key_encryption.ENV_KEY_FILE}):"
              " new upstream keys are stored in plain text")
    elif plain:
        print(f"{plain} key(s) in plain text: encrypt them with apertis-proxy db reencrypt")
    return 1 if any(c["opens"] is False for c in storage) else 0


def cmd_db_reencrypt(args) -> int:
    box = key_encryption.from_environment()
    if box is None:
        raise key_encryption.SecretKeyError(
            f"set {key_encryption.ENV_KEY} (or {key_encryption.ENV_KEY_FILE}) first: the new key first,"
            " then the old ones, separated by commas")
    with open_store(args) as conn:
        count = channel_store.reencrypt_keys(conn, box)
    print(f"encrypted {count} upstream key(s) under the first key of {key_encryption.ENV_KEY};"
          " older keys may now be removed from it")
    return 0


def add_commands(commands: Commands) -> None:
    db = commands.group("db", "the database file")
    db.add("backup", cmd_db_backup, "copy the database to FILE (consistent, also while the server runs)",
           backup_flags)
    db.add("copy", cmd_db_copy, "copy keys, channels, catalogue, spend and the ledger into another database",
           copy_flags)
    db.add("secret-key", cmd_db_secret_key, f"print a new random key for {key_encryption.ENV_KEY}")
    db.add("secrets", cmd_db_secrets, "how each channel's upstream key is stored (encrypted or plain text)")
    db.add("reencrypt", cmd_db_reencrypt,
           f"store every upstream key encrypted under the first key of {key_encryption.ENV_KEY}")
