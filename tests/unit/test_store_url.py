"""PostgreSQL URLs (store/url.py): a password with reserved characters is taken whole, as written or
percent-encoded; the driver gets it encoded; redaction, scrubbing and the error about an unreadable URL show
no part of it."""
from __future__ import annotations

import inspect
import re

import pytest

from apertis_proxy.store.url import parse, redact, split_pg

# Passwords as written in the URL, and what the server must get.
PASSWORDS = [
    ("Zx9/Qw+Er7==", "Zx9/Qw+Er7=="),             # openssl rand -base64
    ("Kq7#Vt2?Wm9", "Kq7#Vt2?Wm9"),
    ("Kq7:Vt2:Wm9", "Kq7:Vt2:Wm9"),
    ("Kq7@Vt2@Wm9", "Kq7@Vt2@Wm9"),
    ("Kq7/Vt2#Wm9?Jx4@Hn5:Bz6", "Kq7/Vt2#Wm9?Jx4@Hn5:Bz6"),
    ("Zx9%2FQw%2BEr7%3D%3D", "Zx9/Qw+Er7=="),     # the same one percent-encoded
    ("Pq%40Xs%25Yw", "Pq@Xs%Yw"),
]


def asyncpg_reads(dsn: str):
    """(hosts, user, password, database) as asyncpg takes `dsn` apart."""
    connect_utils = pytest.importorskip("asyncpg.connect_utils")
    parse_dsn = connect_utils._parse_connect_dsn_and_args
    others = {name: None for name in inspect.signature(parse_dsn).parameters if name != "dsn"}
    addrs, params = parse_dsn(dsn=dsn, **others)[:2]
    return addrs, params.user, params.password, params.database


def pieces(secret: str) -> list[str]:
    """The parts of `secret` between reserved characters: none of them may be shown either."""
    return [p for p in re.split(r"[/+=#?@:%]", secret) if len(p) >= 2]


@pytest.mark.parametrize("written, password", PASSWORDS)
def test_a_password_with_reserved_characters_is_taken_whole(written, password):
    url = parse(f"postgresql://apertis:{written}@db.example:5433/apertis?sslmode=disable")
    parts = split_pg(url.target)
    assert (parts.user, parts.password, parts.rest) == ("apertis", password, "db.example:5433/apertis?sslmode=disable")
    assert asyncpg_reads(url.dsn) == ([("db.example", 5433)], "apertis", password, "apertis")
    assert url.redacted() == "postgresql://apertis:***@db.example:5433/apertis?sslmode=disable"
    message = f"connect failed for {url.target} ({url.dsn}): password {written!r} / {password!r} refused"
    scrubbed = url.scrub(message)
    assert not [p for p in pieces(password) + pieces(written) if p in scrubbed], scrubbed
    assert "postgresql://apertis:***@db.example:5433/apertis" in scrubbed


def test_user_names_hosts_and_sockets_keep_working():
    assert asyncpg_reads(parse("postgresql://u:p@h1:5432,h2:5433/db").dsn)[:3] == (
        [("h1", 5432), ("h2", 5433)], "u", "p")
    assert asyncpg_reads(parse("postgresql://u:p@[::1]:5432/db").dsn)[0] == [("::1", 5432)]
    # A user name with '@' (user@server, as some hosted services want): the last '@' ends the user information.
    assert asyncpg_reads(parse("postgresql://me@srv:s/cret@host/db").dsn)[1:3] == ("me@srv", "s/cret")
    socket_url = parse("postgresql://apertis@/apertis?host=/run/postgresql")
    assert socket_url.dsn == socket_url.target == socket_url.redacted()
    assert asyncpg_reads(socket_url.dsn)[:2] == (["/run/postgresql/.s.PGSQL.5432"], "apertis")
    no_user = parse("postgresql:///apertis?host=/run/postgresql")
    assert no_user.dsn == no_user.redacted() == "postgresql:///apertis?host=/run/postgresql"
    assert redact("postgresql://u@h:5432/db") == "postgresql://u@h:5432/db"
    assert redact("postgres://u:@h/db") == "postgres://u:***@h/db"


def test_a_password_in_the_query_string_is_redacted_too():
    url = parse("postgresql://h/db?user=u&password=s3cr/et&sslmode=require")
    assert url.redacted() == "postgresql://h/db?user=u&password=***&sslmode=require"
    assert "s3cr" not in url.scrub(f"error for {url.target}: password s3cr/et and s3cr%2Fet")


@pytest.mark.parametrize("value", [
    "postgresql://apertis:Zx9/Qw+Er7==",                  # no host part
    "postgresql://apertis:Zx9/Qw+Er7==@db:port/apertis",  # a port that is no number
    "postgresql://apertis:Zx9/Qw+Er7==@db host/apertis",  # a host name with a space
    "postgres://apertis:Zx9:Qw@db:abc",
])
def test_an_unreadable_url_is_named_redacted_in_its_error(value):
    with pytest.raises(ValueError) as caught:
        parse(value)
    message = str(caught.value)
    assert message.startswith("cannot read the database URL postgres"), message
    assert "apertis:***" in message, message
    assert not [p for p in pieces("Zx9/Qw+Er7==") if p in message], message
    assert not [p for p in pieces("Zx9/Qw+Er7==") if p in redact(value)]
