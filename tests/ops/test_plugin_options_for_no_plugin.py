"""README, "Configuration": "`serve` checks the file before it starts: an unknown setting, a setting outside its
table ... stops it with one line naming the setting"; docs/plugins.md: "each plugin's options are a table named after
its entry point".

`[plugins.options.channel]` (the first-party router is `channels`) names no plugin that runs: its `max_attempts = 1`
would silently not apply, and every request would go on being tried on three channels.  Like any other setting that
lands nowhere, it stops `serve` with one line naming it.  (Judgement call: the options of a plugin installed but not
in a chain could be kept for later; a name no chain runs is still never read.)"""
from __future__ import annotations

import subprocess
import sys

from tests.support.processes import clean_env, free_port


def test_an_options_table_for_a_plugin_that_runs_nowhere_is_refused(tmp_path):
    (tmp_path / "apertis.toml").write_text("[plugins.options.channel]\nmax_attempts = 1\n")
    proc = subprocess.Popen([sys.executable, "-m", "apertis_proxy", "serve", "--db", str(tmp_path / "g.db"),
                             "--host", "127.0.0.1", "--port", str(free_port()), "--config", "apertis.toml"],
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
        raise AssertionError("serve started with [plugins.options.channel], an options table no plugin reads:\n"
                             + err[-2000:]) from None
    assert proc.returncode == 1, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "channel" in errors[0], err
