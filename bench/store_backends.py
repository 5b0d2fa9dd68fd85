"""The store alone, SQLite against PostgreSQL, side by side in one run.

    .venv/bin/python bench/store_backends.py [--messages N]

Fifty producers put messages into fifty lanes while one sender takes lane heads and
settles them (``done_soon``), as the uplink worker does: the path every message takes
through the store, without the network around it. PostgreSQL is the test kit's server
(its own data directory, fsync on) on this machine. Prints messages per second and this
process's CPU microseconds per message for each backend.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from gatewayd_testing.postgres import PostgresServer

from gatewayd.store import Queue, StoreSettings, open_store

PRODUCERS = 50


async def drive(settings: StoreSettings, messages: int) -> tuple[float, float]:
    """Messages per second and CPU µs per message for put, take and done."""
    store = await open_store(settings)
    per_producer = messages // PRODUCERS
    total = per_producer * PRODUCERS

    async def producer(p: int) -> None:
        for i in range(per_producer):
            key = f"{p}-{i}"
            await store.put(
                Queue.UPLINK, msg_id=key, dedup_key=key, lane=f"dev{p}", body={"payload": "x" * 100}
            )

    async def sender() -> None:
        done = 0
        while done < total:
            items = await store.take(Queue.UPLINK, limit=64)
            if not items:
                await store.wait_for_work(Queue.UPLINK, 0.2)
                continue
            for item in items:
                store.done_soon(item)
            done += len(items)

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(sender(), *(producer(p) for p in range(PRODUCERS)))
    await store.stats()  # the last dones commit
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    await store.close()
    return total / wall, 1e6 * cpu / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatewayd-store-bench-") as tmp:
        work = Path(tmp)
        server = PostgresServer(work / "pg")
        server.start()
        try:
            backends = {
                "sqlite": StoreSettings(path=work / "store.db"),
                "postgresql": StoreSettings(
                    path=work / "unused.db",
                    backend="postgresql",
                    dsn=server.create_database("bench"),
                ),
            }
            print("| backend | msg/s | CPU µs/msg (put, take, done) |")
            print("|---|---|---|")
            for name, settings in backends.items():
                rate, cpu = asyncio.run(drive(settings, args.messages))
                print(f"| {name} | {rate:,.0f} | {cpu:,.0f} |")
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
