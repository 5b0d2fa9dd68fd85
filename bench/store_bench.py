"""Throughput of Store.put(): group commit vs one commit per message, FULL vs NORMAL.

Run: .venv/bin/python bench/store_bench.py [--messages 20000] [--producers 64]

Each case opens a fresh store in a temporary directory and lets N concurrent producers
put messages with a 200-byte body until the total is reached, timing from the first put
to the last commit. The baseline is the same code with ``batch_max=1``: every message
pays its own transaction and fsync. A second figure shows due() on a large backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Literal

from gatewayd.log import configure
from gatewayd.store import Queue, Store, StoreSettings

Sync = Literal["full", "normal"]


async def put_rate(
    directory: Path, *, synchronous: Sync, batch_max: int, messages: int, producers: int
) -> tuple[float, float]:
    """Messages per second, and rows per commit."""
    path = directory / f"{synchronous}-{batch_max}.db"
    store = await Store.open(StoreSettings(path=path, synchronous=synchronous, batch_max=batch_max))
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
    store = await Store.open(StoreSettings(path=directory / "due.db", synchronous="normal"))
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


if __name__ == "__main__":
    asyncio.run(main())
