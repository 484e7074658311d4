"""Defects found by a review of the fast head parser and observability: each test fails on main.

Each test's docstring says what is wrong and what the right behaviour is.
"""
from __future__ import annotations

from apertis_proxy.observe.access_log import AccessLog
from apertis_proxy.plugin_api import UsageRecord

# What a terminal or a log viewer acts on: C0 controls (ESC starts an escape sequence, NUL truncates in C
# tools) and DEL.  A text log line may hold none of them but its final newline.
_CONTROLS = {chr(c) for c in range(0x20)} | {"\x7f"}


def _text_line(requested_model: str) -> str:
    record = UsageRecord(request_id="req_1", started_at=0.0, endpoint="/v1/messages", key_name="alice",
                         requested_model=requested_model, status=404, error_type="not_found_error")
    log = AccessLog("text")
    return log.lines([log.entry(0.0, 0.01, 404, "POST", "/v1/messages", "127.0.0.1:5", "req_1", record)]).decode()


def test_text_access_log_escapes_control_characters_in_a_clients_model_name():
    """The text access log writes a value bare when it has no whitespace, quote, `=` or backslash
    (access_log._PLAIN, whose comment promises "a client's model name cannot forge a line"), so control
    characters that are not whitespace pass through raw: ESC sequences (clear the screen, move the
    cursor, recolour), NUL, DEL.  Latent today: the gateway refuses a model id of anything but lowercase
    letters, digits and `._-:@/` before it is recorded (checked end to end: the line then shows
    `requested_model=-`), and the other text fields are operator-set or h11-validated; a plugin's key name or
    a looser model check would reach it.  Right: a value with any control character is quoted and escaped,
    as orjson escapes it in the JSON format."""
    line = _text_line("\x1b[2J\x1b[Hforged\x00\x7f")
    assert line.endswith("\n")
    found = sorted({c for c in line[:-1] if c in _CONTROLS})
    assert not found, f"raw control characters in a text log line: {found!r}"
