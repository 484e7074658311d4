"""Request ids: the shape clients see, a new prefix in a forked child and when the counter wraps."""
from __future__ import annotations

import os
import re

from apertis_proxy.http import request_ids
from apertis_proxy.http.request_ids import new_request_id

SHAPE = re.compile(r"req_[0-9a-f]{24}")


def test_a_forked_child_draws_its_own_prefix():
    parent = new_request_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert SHAPE.fullmatch(parent) and SHAPE.fullmatch(child)
    assert child[:20] != parent[:20]


def test_the_counter_wrapping_draws_a_new_prefix(monkeypatch):
    monkeypatch.setattr(request_ids, "_COUNTER_END", 3)
    request_ids._reseed()
    ids = [new_request_id() for _ in range(5)]
    assert all(SHAPE.fullmatch(i) for i in ids)
    assert len(set(ids)) == 5
    assert ids[0][:20] == ids[1][:20] != ids[2][:20] == ids[3][:20] != ids[4][:20]
