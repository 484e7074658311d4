"""A channel's base URL never carries a credential: `channels add` / `channels set` refuse a user name or password
in it (the gateway would not send them: credentials go in --api-key) without echoing the password, and a URL
stored with one by an older version is shown redacted wherever it is printed, with a warning at start."""
from __future__ import annotations

import json
from contextlib import closing

from apertis_proxy.cli import main
from apertis_proxy.store import channels as channel_store
from apertis_proxy.store.schema import connect

URL_SECRET = "Pw-of-the-relay-7c1e9a"
CHANNEL_KEY = "sk-ant-api03-" + "Zq7xK2mP9vL4nR8tW1yB3cD5f"
URL = f"https://team:{URL_SECRET}@relay.example.com"


def run_cli(capsys, db: str, *args: str, code: int = 0) -> str:
    got = main([*args, "--db", db])
    out, err = capsys.readouterr()
    assert got == code, (got, out, err)
    return out + err


def test_channels_add_and_set_refuse_userinfo_in_the_base_url_without_printing_it(tmp_path, capsys):
    """`channels add` and `channels set --base-url` with user:password@ exit non-zero with one line pointing to
    --api-key, print neither the password nor the key, and store nothing."""
    db = str(tmp_path / "apertis.db")
    shown = {}
    for url in (URL, f"https://{URL_SECRET}@relay.example.com", f"https://team:{URL_SECRET}@relay.example.com:99x",
                f"https://team:123/{URL_SECRET}@relay.example.com"):
        shown[f"channels add {url}"] = run_cli(capsys, db, "channels", "add", "relay", "--base-url", url,
                                               "--api-key", CHANNEL_KEY, code=1)
    run_cli(capsys, db, "channels", "add", "relay", "--base-url", "https://relay.example.com",
            "--api-key", CHANNEL_KEY)
    shown["channels set"] = run_cli(capsys, db, "channels", "set", "relay", "--base-url", URL, code=1)
    for command, out in shown.items():
        assert URL_SECRET not in out and CHANNEL_KEY not in out, command
        assert len(out.splitlines()) == 1 and "--api-key" in out, (command, out)
    listed = json.loads(run_cli(capsys, db, "channels", "list", "--json"))
    assert [c["base_url"] for c in listed] == ["https://relay.example.com"]


def test_a_password_in_a_stored_base_url_is_never_printed(tmp_path, capsys):
    """A channel stored with https://user:password@host (an older database): `channels list` (table and --json)
    shows it as https://team:***@relay.example.com and never the password or the key."""
    db = str(tmp_path / "apertis.db")
    run_cli(capsys, db, "channels", "add", "relay", "--base-url", "https://relay.example.com",
            "--api-key", CHANNEL_KEY)
    with closing(connect(db)) as conn:
        conn.execute("UPDATE channels SET base_url = ? WHERE name = 'relay'", (URL,))
    shown = {"channels list": run_cli(capsys, db, "channels", "list"),
             "channels list --json": run_cli(capsys, db, "channels", "list", "--json")}
    leaking = [command for command, out in shown.items() if URL_SECRET in out or CHANNEL_KEY in out]
    assert not leaking, f"the password of the channel's base URL is printed by: {', '.join(leaking)}"
    assert "https://team:***@relay.example.com" in shown["channels list"]
    assert json.loads(shown["channels list --json"])[0]["base_url"] == "https://team:***@relay.example.com"


def test_redacting_a_base_url():
    """The user name stays when a password follows it; a lone user name (often a token) is masked itself."""
    redact = channel_store.redact_base_url
    assert redact("https://relay.example.com/v2") == "https://relay.example.com/v2"
    assert redact(URL + "/v2") == "https://team:***@relay.example.com/v2"
    assert redact(f"https://{URL_SECRET}@relay.example.com") == "https://***@relay.example.com"
    assert URL_SECRET not in redact(f"https://team:{URL_SECRET}@relay.example.com:99x")
    assert URL_SECRET not in redact(f"https://team:{URL_SECRET}@[::1")
    assert redact(f"https://team:123/{URL_SECRET}@relay.example.com") == "https://***@relay.example.com"


def test_serve_warns_once_that_a_stored_userinfo_is_not_used(tmp_path):
    """At start, one warning names the channel and its redacted URL: the user name and password are not sent."""
    db = str(tmp_path / "apertis.db")
    with closing(connect(db)) as conn:
        channel_store.add_channel(conn, "relay", "https://relay.example.com", CHANNEL_KEY)
        channel_store.add_channel(conn, "plain", "https://api.example.com", CHANNEL_KEY)
        conn.execute("UPDATE channels SET base_url = ? WHERE name = 'relay'", (URL,))
    from apertis_proxy.cli.serve import _check_channel_urls
    said = []
    with closing(connect(db)) as conn:
        _check_channel_urls(conn, lambda message, level=None: said.append(message))
    assert len(said) == 1 and URL_SECRET not in said[0]
    assert "relay" in said[0] and "https://team:***@relay.example.com" in said[0] and "plain" not in said[0]
