"""`serve --workers 2` on SQLite: a worker killed with SIGKILL while it holds a key's only concurrency slot (a stream
in flight) frees the slot by itself once its lease runs out (`[limits] lease_seconds`), and the worker that replaced
it, or the other one, admits the key's next request; no operator action, no slot leaked for good."""
from __future__ import annotations

import asyncio

from tests.support.limits_load import CountingUpstream, Hosts, OpenStream, refusal_problem, send, setup_store
from tests.support.processes import wait_for
from tests.support.workers import TCP_ESTABLISHED, crash_and_replace, listening_workers, sockets_of

LEASE = 1.5


def quick(n: int, stream: bool = False) -> dict:
    return {"model": "claude-haiku-4-5-20251001", "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": f"request {n}"}]}


async def test_a_killed_worker_holding_the_only_slot_frees_it_after_its_lease(tmp_path):
    db = str(tmp_path / "gateway.db")
    async with CountingUpstream() as mock:
        key = await asyncio.to_thread(setup_store, db, mock, "alice", "--concurrency", "1")
        async with await Hosts.workers(db, tmp_path, lease_seconds=LEASE) as hosts:
            [server] = hosts.processes
            workers = await listening_workers(server, 2)
            held = await OpenStream.open(server.port, key, quick(0, stream=True), {"x-mock-scenario": "event-delay=2"})
            try:
                assert held.status == 200
                client_port = held.conn.writer.get_extra_info("sockname")[1]
                [victim] = [w for w in workers if sockets_of(w, local_port=server.port, remote_port=client_port,
                                                             state=TCP_ESTABLISHED)]
                busy = await send(server.port, key, quick(1))
                assert busy.status == 429 and refusal_problem(busy) is None, busy
                await crash_and_replace(server, victim)
            finally:
                held.abort()

            statuses: list[int] = []

            async def admitted() -> bool:
                answer = await send(server.port, key, quick(2))
                statuses.append(answer.status)
                assert answer.status in (200, 429), answer
                return answer.status == 200
            await wait_for(admitted, 3 * LEASE + 10, "a request admitted once the killed worker's lease ran out",
                           interval=0.25)
            # And the slot is one again: two streams at once are not both admitted.
            first = await OpenStream.open(server.port, key, quick(3, stream=True),
                                          {"x-mock-scenario": "event-delay=0.3"})
            try:
                assert first.status == 200
                second = await send(server.port, key, quick(4))
                assert second.status == 429 and refusal_problem(second) is None, second
            finally:
                await first.finish()
