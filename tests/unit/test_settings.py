"""The configuration file: what it may say, and the one-line error for what it may not (a wrong type or value is
refused at start-up instead of failing every request later)."""
from __future__ import annotations

import pytest

from apertis_proxy import cli, settings
from apertis_proxy.fd_limits import connection_cap


def load(tmp_path, text: str) -> settings.Settings:
    path = tmp_path / "apertis.toml"
    path.write_text(text)
    return settings.load(str(path))


def test_a_full_valid_file_loads(tmp_path):
    s = load(tmp_path, """
[server]
port = 9090
workers = 2
max_body_bytes = 1048576
max_connections = 500
header_timeout = 5
shutdown_timeout = 0
[upstream]
read_timeout = 120.5
[contract]
default_api_version = "2023-06-01"
[logging]
log_level = "debug"
[plugins]
auth = ["keys"]
meter = []
[plugins.options.channels]
max_attempts = 2
""")
    assert (s.port, s.workers, s.read_timeout, s.shutdown_timeout, s.meter_plugins) == (9090, 2, 120.5, 0, [])
    assert s.max_connections == 500
    assert s.plugin_options == {"channels": {"max_attempts": 2}}


def test_metrics_and_logging_sections_load(tmp_path):
    s = load(tmp_path, """
[server]
drain_delay = 5
[logging]
format = "json"
access_log = false
[metrics]
enabled = true
allow = ["127.0.0.0/8", "10.0.0.0/8", "fd00::/8"]
per_key = true
flush_interval = 0.5
""")
    assert (s.drain_delay, s.log_format, s.access_log) == (5, "json", False)
    assert (s.metrics_enabled, s.metrics_allow, s.metrics_per_key, s.metrics_flush_interval) == (
        True, ["127.0.0.0/8", "10.0.0.0/8", "fd00::/8"], True, 0.5)
    defaults = settings.Settings()
    assert (defaults.log_format, defaults.access_log, defaults.metrics_allow) == (
        "text", True, ["127.0.0.0/8", "::1/128"])


def test_public_url_loads_from_server(tmp_path):
    assert load(tmp_path, '[server]\npublic_url = "https://llm.example.com/gw"\n').public_url == \
        "https://llm.example.com/gw"
    assert settings.Settings().public_url is None


def test_cors_origins_load_from_server_and_allow_any_origin_by_default(tmp_path):
    s = load(tmp_path, '[server]\ncors_origins = ["https://app.example.com", "http://localhost:5173"]\n')
    assert s.cors_origins == ["https://app.example.com", "http://localhost:5173"]
    assert load(tmp_path, "[server]\ncors_origins = []\n").cors_origins == []
    assert settings.Settings().cors_origins == ["*"]


@pytest.mark.parametrize("text,says", [
    ("[server]\nport = 110659", "port must be 0..65535"),
    ('[server]\nport = "http"', "port must be a whole number"),
    ('[upstream]\nconnect_timeout = "10s"', "connect_timeout must be a number of seconds > 0"),
    ('[server]\nmax_body_bytes = "32MB"', "max_body_bytes must be a whole number"),
    ("[upstream]\nread_timeout = -1", "read_timeout must be a number of seconds > 0"),
    ("[server]\nmax_body_bytes = -1", "max_body_bytes must be a whole number >= 1"),
    ("[server]\nheader_timeout = true", "header_timeout must be a number of seconds"),
    ("[server]\nshutdown_timeout = -5", "shutdown_timeout must be a number of seconds >= 0"),
    ("[server]\nworkers = -2", "workers must be a whole number >= 1"),
    ('[server]\nworkers = "two"', "workers must be a whole number"),
    ("[server]\nmax_connections = 0", "max_connections must be a whole number >= 1"),
    ('[logging]\nlog_level = "LOUD"', "log_level must be one of"),
    ('[contract]\ndefault_api_version = "yesterday"', "default_api_version must be a date"),
    ('[plugins]\nauth = "keys"', "[plugins] auth must be a list of plugin names"),
    ('[plugins]\nauht = ["keys"]', "unknown key(s) under [plugins]"),
    ("[plugins]\noptions = 5", "[plugins.options.NAME] must be tables"),
    ("[server]\nmax_bodybytes = 5", "unknown setting(s)"),
    ('[logging]\nformat = "xml"', "[logging] format must be one of text, json"),
    ('[logging]\naccess_log = "yes"', "access_log must be true or false"),
    ('[metrics]\nallow = "10.0.0.0/8"', "[metrics] allow must be a list of networks"),
    ('[metrics]\nallow = ["10.0.0.0/33"]', "[metrics] allow: '10.0.0.0/33' is not a network"),
    ("[metrics]\nflush_interval = 0", "metrics_flush_interval must be a number of seconds > 0"),
    ("[server]\ndrain_delay = -1", "drain_delay must be a number of seconds >= 0"),
    ('[server]\ncors_origins = "*"', "cors_origins must be a list of origins"),
    ('[server]\ncors_origins = ["https://app.example.com/"]', "cors_origins must be a list of origins"),
    ('[server]\npublic_url = "llm.example.com"', "public_url must be an http(s) address"),
    ('[server]\npublic_url = "https://llm.example.com/?x=1"', "public_url must be an http(s) address"),
    ('[server]\npublic_url = "https://user@llm.example.com"', "public_url must be an http(s) address"),
])
def test_a_wrong_value_is_refused_with_one_line_naming_it(tmp_path, text, says):
    with pytest.raises(ValueError) as err:
        load(tmp_path, text)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("configured,nofile,cap", [(10_000, 1024, 480), (10_000, 1_048_576, 10_000), (300, 1024, 300),
                                                   (10_000, 0, 10_000), (10_000, 40, 16)])
def test_the_connection_cap_leaves_a_descriptor_per_connection_for_its_upstream(configured, nofile, cap):
    assert connection_cap(configured, nofile) == cap


def test_serve_with_a_bad_config_exits_with_that_line(tmp_path, capsys):
    path = tmp_path / "apertis.toml"
    path.write_text('[upstream]\nconnect_timeout = "10s"\n')
    code = cli.main(["serve", "--db", str(tmp_path / "g.db"), "--config", str(path)])
    out = capsys.readouterr()
    assert code == 1 and "connect_timeout must be a number of seconds > 0" in out.err
    assert "Traceback" not in out.err + out.out


# Each setting lives in the table README's Configuration block shows it in.

@pytest.mark.parametrize("text,says", [
    ("[upstream]\nmax_body_bytes = 1024", "max_body_bytes belongs under [server], not [upstream]"),
    ("[server]\nread_timeout = 5", "read_timeout belongs under [upstream], not [server]"),
    ("[server]\nformat = \"json\"", "format belongs under [logging], not [server]"),
    ("[server]\nlog_format = \"json\"", "log_format belongs under [logging] as format, not [server]"),
    ("[logging]\nlog_format = \"json\"", "under [logging] this setting is written format, not log_format"),
    ("max_body_bytes = 1024", "max_body_bytes belongs under [server], not the top level"),
    ("config_poll_interval = 0.5\n[server]\nport = 1",
     "config_poll_interval belongs under [server], not the top level"),
    ("log_level = \"DEBUG\"", "log_level belongs under [logging], not the top level"),
    ('db = "other.db"', "db is not a file setting; give the database with --db or env APERTIS_DB"),
    ('[server]\ndb = "other.db"', "db is not a file setting"),
    ("[metrics]\nmax_attempts = 3", "unknown setting(s)"),
    ("server = 5", "[server] must be a table"),
    ("[upstream]\ncors_origins = []", "cors_origins belongs under [server], not [upstream]"),
])
def test_a_setting_outside_its_table_is_refused_naming_its_table(tmp_path, text, says):
    with pytest.raises(ValueError) as err:
        load(tmp_path, text)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_renamed_keys_load_from_their_tables(tmp_path):
    s = load(tmp_path, """
[ledger]
fsync = "always"
[logging]
format = "json"
[metrics]
enabled = false
allow = ["10.0.0.0/8"]
per_key = true
flush_interval = 2.0
[limits]
lease_seconds = 7.5
on_store_down = "share"
[budgets]
webhook_url = "https://hooks.example.com/a"
thresholds = [50]
webhook_attempts = 2
webhook_backoff = 0.5
""")
    assert (s.ledger_fsync, s.log_format) == ("always", "json")
    assert (s.metrics_enabled, s.metrics_allow, s.metrics_per_key, s.metrics_flush_interval) == (
        False, ["10.0.0.0/8"], True, 2.0)
    assert (s.limits_lease_seconds, s.limits_on_store_down) == (7.5, "share")
    assert (s.budget_webhook_url, s.budget_thresholds, s.budget_webhook_attempts, s.budget_webhook_backoff) == (
        "https://hooks.example.com/a", [50], 2, 0.5)


def test_server_host_port_workers_poll_load_and_flags_win(tmp_path):
    text = '[server]\nhost = "0.0.0.0"\nport = 9001\nworkers = 3\nconfig_poll_interval = 0.25\n'
    s = load(tmp_path, text)
    assert (s.host, s.port, s.workers, s.config_poll_interval) == ("0.0.0.0", 9001, 3, 0.25)
    flags = settings.load(str(tmp_path / "apertis.toml"), host="127.0.0.2", port=9002, workers=1)
    assert (flags.host, flags.port, flags.workers, flags.config_poll_interval) == ("127.0.0.2", 9002, 1, 0.25)


def test_serve_refuses_a_misplaced_setting_with_one_line(tmp_path, capsys):
    path = tmp_path / "apertis.toml"
    path.write_text("[upstream]\nmax_body_bytes = 1024\n")
    code = cli.main(["serve", "--db", str(tmp_path / "g.db"), "--config", str(path)])
    out = capsys.readouterr()
    assert code == 1 and "max_body_bytes belongs under [server], not [upstream]" in out.err
    assert len(out.err.strip().splitlines()) == 1 and not (tmp_path / "g.db").exists()
