"""Review s10f: the readiness probe ("Probes" in README.md) against what clients get.

/ready is what a load balancer routes by. When the ledger spool is full (the database takes no usage rows:
here a SQLite file another process holds the write lock of) every new request gets 503 overloaded_error, yet
/ready must not keep saying 200: the balancer would go on sending every client to an instance that refuses all.
"""
from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.request

from tests.support.processes import MODEL
from tests.support.served_gateway import configured_server


def _post(base_url: str, key: str) -> int:
    body = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(f"{base_url}/v1/messages", data=body, method="POST",
                                 headers={"x-api-key": key, "content-type": "application/json",
                                          "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _ready(base_url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{base_url}/ready", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_ready_is_not_200_while_a_full_spool_refuses_every_request(tmp_path, mock_upstream):
    import asyncio
    server, db, key = configured_server(tmp_path, mock_upstream.base_url,
                                        "[ledger]\nspool_max_bytes = 4096\nspool_warn_bytes = 0\n")
    async with server:
        holder = sqlite3.connect(db, timeout=1.0, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")       # e.g. a long maintenance write, a stuck CLI
        try:
            statuses = []
            for _ in range(40):
                statuses.append(await asyncio.to_thread(_post, server.base_url, key))
                if statuses[-1] == 503:
                    break
            assert statuses[-1] == 503, f"the spool never filled: {statuses}"
            status, body = await asyncio.to_thread(_ready, server.base_url)
            assert status == 503, (
                f"/ready says {status} {body} while every new request gets 503 overloaded_error (ledger spool"
                " full): a load balancer keeps routing all traffic to this instance")
        finally:
            holder.execute("ROLLBACK")
            holder.close()


async def test_a_full_spool_admits_requests_again_once_the_database_takes_rows(tmp_path, mock_upstream):
    """Holds: the documented recovery (503 until the database takes rows, then served; no row lost)."""
    import asyncio
    server, db, key = configured_server(tmp_path, mock_upstream.base_url,
                                        "[ledger]\nspool_max_bytes = 4096\nspool_warn_bytes = 0\n")
    async with server:
        holder = sqlite3.connect(db, timeout=1.0, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        ok = 0
        try:
            for _ in range(40):
                status = await asyncio.to_thread(_post, server.base_url, key)
                if status == 503:
                    break
                ok += status == 200
            assert status == 503
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        for _ in range(50):
            status = await asyncio.to_thread(_post, server.base_url, key)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200, "still refused after the database took rows again"
        conn = sqlite3.connect(db)
        try:
            for _ in range(50):
                n = conn.execute("SELECT count(*) FROM usage WHERE status = 200").fetchone()[0]
                if n >= ok + 1:
                    break
                await asyncio.sleep(0.1)
        finally:
            conn.close()
        assert n == ok + 1, f"{ok + 1} answered requests, {n} ledger rows"
