"""Throughput of Store.put(): group commit vs one commit per message, FULL vs NORMAL.

Run: .venv/bin/python bench/store_bench.py [--messages 20000] [--producers 64]

Each case opens a fresh store in a temporary directory and lets N concurrent producers
put messages with a 200-byte body until the total is reached, timing from the first put
to the last commit. The baseline is the same code with ``batch_max=1``: every message
pays its own transaction and fsync. Then the senders' side on a large backlog: the SQL
``due()``, and the lane index's ``take()`` + ``done_soon()`` per message at 0, 10k and
100k pending (its cost must not grow with the backlog).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Literal

from gatewayd.log import configure
from gatewayd.store import Queue, SqliteStore, StoreSettings
from gatewayd.store.writer import Txn

Sync = Literal["full", "normal"]


async def put_rate(
    directory: Path, *, synchronous: Sync, batch_max: int, messages: int, producers: int
) -> tuple[float, float]:
    """Messages per second, and rows per commit."""
    path = directory / f"{synchronous}-{batch_max}.db"
    store = await SqliteStore.open(
        StoreSettings(path=path, synchronous=synchronous, batch_max=batch_max)
    )
    body = {"oriAddr": {"addrType": "UE", "addr": "dev@iot"}, "payload": "x" * 120}
    per_producer = messages // producers

    async def producer(p: int) -> None:
        for i in range(per_producer):
            key = f"{p}-{i}"
            await store.put(Queue.UPLINK, msg_id=key, dedup_key=key, lane=f"dev{p}", body=body)

    try:
        before = await store.stats()
        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for p in range(producers):
                group.create_task(producer(p), name=f"bench-producer-{p}")
        elapsed = time.perf_counter() - start
        after = await store.stats()
    finally:
        await store.close()
    commits = after["commits"] - before["commits"] - 1
    return per_producer * producers / elapsed, per_producer * producers / max(commits, 1)


async def due_cost(directory: Path, backlog: int) -> float:
    """Milliseconds for one due() over ``backlog`` pending rows in distinct lanes."""
    store = await SqliteStore.open(StoreSettings(path=directory / "due.db", synchronous="normal"))
    try:
        for start in range(0, backlog, 1000):
            await asyncio.gather(
                *(
                    store.put(Queue.UPLINK, msg_id=str(i), dedup_key=str(i), lane=f"d{i}", body={})
                    for i in range(start, min(start + 1000, backlog))
                )
            )
        runs = 20
        begin = time.perf_counter()
        for _ in range(runs):
            await store.due(Queue.UPLINK, limit=64)
        return (time.perf_counter() - begin) / runs * 1000
    finally:
        await store.close()


async def take_cost(directory: Path, backlog: int, *, messages: int = 5000) -> tuple[float, int]:
    """Microseconds per message for put -> take() -> done_soon() with ``backlog`` items
    pending in other lanes (100 devices, 64 in flight), and the transactions per message."""
    store = await SqliteStore.open(
        StoreSettings(
            path=directory / f"take-{backlog}.db", synchronous="normal", max_messages=1_000_000
        )
    )
    try:
        for start in range(0, backlog, 1000):
            await asyncio.gather(
                *(
                    store.put(Queue.UPLINK, msg_id=str(i), dedup_key=str(i), lane=f"b{i}", body={})
                    for i in range(start, min(start + 1000, backlog))
                )
            )

        # The backlog's lanes wait out a retry an hour away: what is measured is the hot
        # path next to them, not their drain. One bulk UPDATE, then the index reloads.
        def park(txn: Txn) -> None:
            txn.conn.execute("UPDATE items SET not_before = ?", (time.time() + 3600,))
            txn.reindex = True

        await store._writer.call(park)
        body = {"oriAddr": {"addrType": "UE", "addr": "dev@iot"}, "payload": "x" * 120}
        commits = store._writer.commits
        begin = time.perf_counter()
        sent = 0
        for start in range(0, messages, 100):
            await asyncio.gather(
                *(
                    store.put(
                        Queue.UPLINK,
                        msg_id=f"h{i}",
                        dedup_key=f"h{i}",
                        lane=f"d{i % 100}",
                        body=body,
                    )
                    for i in range(start, start + 100)
                )
            )
            while sent < start + 100:
                items = await store.take(Queue.UPLINK, limit=64)
                for item in items:
                    store.done_soon(item)
                sent += len(items)
                await asyncio.sleep(0)
        await store.stats()  # the last done() commits
        elapsed = time.perf_counter() - begin
        return elapsed / messages * 1e6, store._writer.commits - commits
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--producers", type=int, default=64)
    parser.add_argument("--backlog", type=int, default=100_000, help="rows for the due() figure")
    args = parser.parse_args()
    configure(level="warning")

    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        directory = Path(tmp)
        print(f"{args.messages} messages, {args.producers} concurrent producers, 200-byte bodies")
        print(f"{'synchronous':<12}{'mode':<24}{'msgs/s':>10}{'rows/commit':>13}")
        for synchronous in ("full", "normal"):
            single, _ = await put_rate(
                directory,
                synchronous=synchronous,
                batch_max=1,
                messages=args.messages,
                producers=args.producers,
            )
            group, per_commit = await put_rate(
                directory,
                synchronous=synchronous,
                batch_max=512,
                messages=args.messages,
                producers=args.producers,
            )
            print(f"{synchronous:<12}{'one commit per message':<24}{single:>10.0f}{1:>13.1f}")
            print(f"{synchronous:<12}{'group commit':<24}{group:>10.0f}{per_commit:>13.1f}")
            print(f"{synchronous:<12}{'ratio group/single':<24}{group / single:>10.1f}x")
        lone, _ = await put_rate(
            directory, synchronous="full", batch_max=512, messages=2000, producers=1
        )
        print(f"full        one producer, sequential {lone:>8.0f} msgs/s (no one to share with)")
        ms = await due_cost(directory, args.backlog)
        print(f"due(limit=64) over {args.backlog} pending rows in distinct lanes: {ms:.1f} ms")
        for pending in sorted({0, min(10_000, args.backlog), args.backlog}):
            us, commits = await take_cost(directory, pending)
            print(
                f"put + take + done_soon with {pending:>6} pending elsewhere:"
                f" {us:6.1f} us/msg, {commits / 5000:.3f} transactions/msg"
            )


if __name__ == "__main__":
    asyncio.run(main())
