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
