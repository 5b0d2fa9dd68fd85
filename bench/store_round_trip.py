"""What a store transaction costs when messages come one at a time (docs/performance.md,
"Why light load costs more per message").

    .venv/bin/python bench/store_round_trip.py

CPU microseconds (this process, all threads) per operation, each done N times in a row
and awaited one by one, on the stock asyncio loop and on uvloop:

- SQLite alone: a one-row ``INSERT`` in its own transaction, ``synchronous=FULL`` (the
  store's default) and ``NORMAL``;
- a bare round trip to a thread: ``SimpleQueue.put`` to wake it, ``call_soon_threadsafe``
  to answer, as the store's writer does, with no work in between;
- the store's writer running a job that does nothing (one empty transaction);
- ``Store.put`` awaited alone, and the same puts from 64 producers at once (batched).
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gatewayd.log import configure
from gatewayd.store import Queue, StoreSettings, open_store
from gatewayd.store.schema import _DDL

N = 3000
BODY = {"payload": "x" * 100}


def sqlite_alone(synchronous: str, directory: Path) -> float:
    conn = sqlite3.connect(directory / f"raw-{synchronous}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(_DDL)
    start = time.process_time()
    for i in range(N):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO items (queue, msg_id, dedup_key, lane, body, size, created, queued)"
            " VALUES ('uplink', ?, ?, 'lane', ?, 150, 0, 0)",
            (f"m{i}", f"k{i}", "x" * 150),
        )
        conn.execute("COMMIT")
    conn.close()
    return (time.process_time() - start) / N * 1e6


async def per_call(fn: Callable[[int], Awaitable[object]], count: int = N) -> float:
    start = time.process_time()
    for i in range(count):
        await fn(i)
    return (time.process_time() - start) / count * 1e6


async def on_loop(directory: Path) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    jobs: queue.SimpleQueue[asyncio.Future[None] | None] = queue.SimpleQueue()

    def answer() -> None:
        while (future := jobs.get()) is not None:
            loop.call_soon_threadsafe(future.set_result, None)

    thread = threading.Thread(target=answer, name="bench-hop")
    thread.start()

    async def hop(_: int) -> None:
        future = loop.create_future()
        jobs.put(future)
        await future

    figures = {"thread round trip": await per_call(hop)}
    jobs.put(None)
    thread.join()

    store = await open_store(StoreSettings(path=directory / f"store-{id(loop)}.db"))
    try:
        writer = store._writer  # type: ignore[attr-defined] # the SQLite store's, on purpose
        figures["writer: empty job"] = await per_call(lambda _: writer.call(lambda txn: None))

        async def lone(i: int) -> object:
            key = f"lone-{i}"
            return await store.put(Queue.UPLINK, msg_id=key, dedup_key=key, lane="d", body=BODY)

        figures["put, awaited alone"] = await per_call(lone)

        async def producer(p: int) -> None:
            for i in range(N // 64):
                key = f"batch-{p}-{i}"
                await store.put(Queue.UPLINK, msg_id=key, dedup_key=key, lane=f"d{p}", body=BODY)

        start = time.process_time()
        async with asyncio.TaskGroup() as group:
            for p in range(64):
                group.create_task(producer(p))
        figures["put, 64 producers"] = (time.process_time() - start) / (N // 64 * 64) * 1e6
    finally:
        await store.close()
    return figures


def main() -> None:
    configure(level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; CPU µs per operation")
        print("| operation | asyncio | uvloop |")
        print("|---|---|---|")
        for sync in ("FULL", "NORMAL"):
            cost = sqlite_alone(sync, directory)
            print(f"| SQLite one-row transaction, synchronous={sync} | {cost:.0f} | - |")
        stock = asyncio.run(on_loop(directory))
        try:
            import uvloop  # the speed extra; ./dev bench installs it
        except ImportError:
            fast: dict[str, float] = {}
        else:
            fast = uvloop.run(on_loop(directory))
        for name in stock:
            other = f"{fast[name]:.0f}" if name in fast else "not installed"
            print(f"| {name} | {stock[name]:.0f} | {other} |")


if __name__ == "__main__":
    main()
