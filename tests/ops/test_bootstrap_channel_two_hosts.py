"""README, "Run it": "On first start with `APERTIS_UPSTREAM_API_KEY` set and no channel configured, a channel
`anthropic` to `https://api.anthropic.com` is created"; "Several hosts on PostgreSQL": every host is given the same
`--db postgresql://...` and the same environment, and "hosts starting together are safe".  The code says of that
first-start step: "the check and the insert are one step, even with several starters".

Two hosts starting together on an empty PostgreSQL database, both with `APERTIS_UPSTREAM_API_KEY`: each checks
that no channel exists before either has inserted one (the window two real hosts can hit; here both are held at
that point so that the test does not depend on luck).  Both must start: one creates the channel, the other finds
it there; never an error that stops a host's first start."""
from __future__ import annotations

import threading

from apertis_proxy.store import channels as channel_store
from apertis_proxy.store import service

ENV = {"APERTIS_UPSTREAM_API_KEY": "sk-ant-first-start-key"}


def test_two_hosts_bootstrapping_together_make_one_channel_and_both_start(pg_url, monkeypatch):
    service.connect(pg_url).close()           # the schema, as the first command makes it
    real_count = channel_store.channel_count
    both_checked = threading.Barrier(2)

    def count_then_meet(conn) -> int:
        n = real_count(conn)
        try:
            both_checked.wait(timeout=3)       # a host that locks others out makes the other wait here: fine
        except threading.BrokenBarrierError:
            pass
        return n

    monkeypatch.setattr(channel_store, "channel_count", count_then_meet)
    results: dict[str, object] = {}

    def host(name: str) -> None:
        conn = service.connect(pg_url)
        try:
            results[name] = channel_store.bootstrap_default_channel(conn, ENV)
        except Exception as exc:       # noqa: BLE001 - what `serve` would stop with
            results[name] = exc
        finally:
            conn.close()

    threads = [threading.Thread(target=host, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    failures = {name: r for name, r in results.items() if isinstance(r, BaseException)}
    assert not failures, f"a host's first start failed: {failures!r}"
    conn = service.connect(pg_url)
    try:
        names = [row[0] for row in conn.execute("SELECT name FROM channels").fetchall()]
    finally:
        conn.close()
    assert names == ["anthropic"], names
    assert sum(1 for r in results.values() if r) == 1, results      # one says it created the channel
