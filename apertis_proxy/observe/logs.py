"""The process's log format: human-readable text (the default) or one JSON object per line.

Both the gateway's own messages and the access log (access_log.py) use it, so
a log shipper needs one parser.  A JSON line always has `time` (UTC, RFC 3339
with milliseconds), `level`, `logger` and `message`; a traceback comes as
`exc_info`.
"""
from __future__ import annotations

import logging
import sys
import time

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# The milliseconds of a timestamp, as three digits.
THOUSANDTHS = [f"{n:03d}" for n in range(1000)]


class Clock:
    """Timestamps with milliseconds, the seconds part formatted once per second: RFC 3339 in UTC
    (2026-12-05T09:30:00.123Z, the JSON format's) or local time as logging's text format writes it
    (2026-12-05 09:30:00,123)."""

    __slots__ = ("_second", "_prefix", "_utc", "_millis", "_stamp")

    def __init__(self, utc: bool = True) -> None:
        self._second = -1
        self._prefix = ""
        self._utc = utc
        self._millis = -1
        self._stamp = ""

    def __call__(self, t: float) -> str:
        return self.at_millis(int(t * 1000))

    def at_millis(self, millis: int) -> str:
        """The timestamp of a time in whole milliseconds since the epoch."""
        if millis == self._millis:          # busy: several lines in one millisecond
            return self._stamp
        self._millis = millis
        self._stamp = self.second_prefix(millis // 1000) + THOUSANDTHS[millis % 1000] + ("Z" if self._utc else "")
        return self._stamp

    def second_prefix(self, second: int) -> str:
        """The timestamp of a time in whole seconds since the epoch, up to its milliseconds."""
        if second != self._second:
            self._second = second
            self._prefix = (time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)) if self._utc
                            else time.strftime("%Y-%m-%d %H:%M:%S,", time.localtime(second)))
        return self._prefix


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._clock = Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self._clock(record.created), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def json_line(level: int, logger: str, message: str) -> str:
    """`message` as one line of the JSON format, for what is printed before logging is configured."""
    return JsonFormatter().format(logging.LogRecord(logger, level, "", 0, message, None, None))


def configure(level: str, fmt: str) -> None:
    """Log to stderr at `level`, in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
