"""How many requests a `kill -9` of the gateway takes out of the ledger.

Starts the bench mock upstream and `apertis-proxy serve` (one worker, default
meter settings) on a fresh database, keeps N clients sending small requests
on keep-alive connections for a while, then SIGKILLs the gateway under that
load. Every response a client received whole has its request-id.  The script
counts how many of those were only in the ledger spool at the kill, starts the
gateway again (it ships the dead worker's spool) and stops it, then reads the
ledger and prints how many have no row, and how long before the kill the lost
ones completed.  It also compares the ledger with the requests the mock
received: the requests in flight at the kill have rows with their usage
unknown (error_type gateway_stopped), so the ledger holds a row for every
request that reached the upstream (one more where a request was noted and
the kill came before its bytes went out).

    python bench/kill9.py [--clients 32] [--seconds 5] [--runs 3] [--config FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MODEL = "claude-haiku-4-5-20251001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_mock() -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(BENCH / "mock_upstream.py"), "--port", "0",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    line = (await proc.stdout.readline()).decode()
    return proc, int(line.rsplit(":", 1)[1])


def spooled_rows(directory: str) -> list:
    from apertis_proxy.store.ledger_spool import spooled_rows as rows
    return rows(directory)


def prepare(db: str, mock_port: int) -> str:
    from apertis_proxy.store import channels, keys, schema
    conn = schema.connect(db)
    try:
        channels.add_channel(conn, "main", f"http://127.0.0.1:{mock_port}", "sk-ant-bench")
        return keys.create_key(conn, "bench")[1]
    finally:
        conn.close()


async def serve(port: int, db: str, config: list[str]) -> asyncio.subprocess.Process:
    gw = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "apertis_proxy", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--db", db, *config, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    return gw


async def client(port: int, key: str, done: list[tuple[str, float]], stop: asyncio.Event) -> None:
    body = (b'{"model":"%s","max_tokens":16,"messages":[{"role":"user","content":"kill -9 probe"}]}'
            % MODEL.encode())
    request = (b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: %s\r\ncontent-type: application/json"
               b"\r\ncontent-length: %d\r\n\r\n%s" % (key.encode(), len(body), body))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not stop.is_set():
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = rid = None
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"request-id":
                    rid = value.strip().decode()
            await reader.readexactly(length or 0)
            if head.startswith(b"HTTP/1.1 200"):
                done.append((rid, time.monotonic()))       # received whole
    except (ConnectionError, asyncio.IncompleteReadError, OSError):
        pass                                                # the gateway died


async def one_run(clients: int, seconds: float, config: list[str]) -> dict:
    mock, mock_port = await start_mock()
    with tempfile.TemporaryDirectory() as work:
        db = str(Path(work) / "kill9.db")
        key = prepare(db, mock_port)
        port = free_port()
        gw = await serve(port, db, config)
        done: list[tuple[str, float]] = []
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client(port, key, done, stop)) for _ in range(clients)]
        await asyncio.sleep(seconds)
        killed_at = time.monotonic()
        os.kill(gw.pid, signal.SIGKILL)
        await gw.wait()
        stop.set()
        await asyncio.gather(*tasks)
        spooled = len(spooled_rows(db + ".spool"))
        again = await serve(port, db, config)       # adopts the spool and ships it
        again.send_signal(signal.SIGTERM)
        await again.wait()
        conn = sqlite3.connect(db)
        metered = {r[0] for r in conn.execute("SELECT request_id FROM usage")}
        rows, unknown = conn.execute("SELECT COUNT(*), COALESCE(SUM(error_type = 'gateway_stopped'), 0)"
                                     " FROM usage WHERE reached_upstream = 1").fetchone()
        conn.close()
    mock.send_signal(signal.SIGTERM)
    _, mock_says = await mock.communicate()
    upstream = int(mock_says.decode().split("mock: ", 1)[1].split()[0])
    lost = [killed_at - t for rid, t in done if rid not in metered]
    return {"received": len(done), "lost": len(lost), "rate": len(done) / seconds, "spooled": spooled,
            "oldest_lost_ms": max(lost) * 1000 if lost else 0.0, "upstream": upstream, "rows": rows,
            "unknown": unknown}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--config", help="a settings file for the gateway (e.g. other meter options)")
    args = p.parse_args()
    for i in range(args.runs):
        r = await one_run(args.clients, args.seconds, ["--config", args.config] if args.config else [])
        print(f"run {i + 1}: {r['received']} responses received whole ({r['rate']:.0f}/s), {r['spooled']} rows "
              f"only in the spool at the kill, {r['lost']} without a ledger row after a restart "
              f"({100 * r['lost'] / max(1, r['received']):.1f}%); the oldest lost one completed "
              f"{r['oldest_lost_ms']:.0f} ms before the kill; the mock received {r['upstream']} requests, the "
              f"ledger holds {r['rows']} rows of requests that reached it ({r['unknown']} of them in flight at the "
              f"kill, usage unknown)", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
