"""Cost of MSGin5G segmentation: cutting uplink payloads, and reassembly in the store.

Run: .venv/bin/python bench/segments_bench.py [--messages 2000] [--segments 4] [--producers 64]

1. ``segments.split`` of a payload into ``--segments`` segments of 2048 bytes: CPU per
   message.
2. Downlink reassembly: ``--producers`` concurrent senders push every segment of
   ``--messages`` messages through ``put_downlink_segment`` (store under FULL, group
   commit). The baseline, in the same run, puts the same number of plain rows of the
   same size with ``SqliteStore.put``. Wall time and this process's CPU time (both threads).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gatewayd import segments
from gatewayd.log import configure
from gatewayd.msgin5g.model import Address, GatewayMessageDelivery, UEMessageDelivery
from gatewayd.store import Queue, SqliteStore, StoreSettings

SIZE = 2048


def split_cost(count: int, n_segments: int) -> float:
    """CPU microseconds to cut one message into its segments."""
    message = UEMessageDelivery(
        ori_addr=Address.ue("dev@iot"),
        dest_addr=Address("AS", "as@iot"),
        msg_id="m",
        sto_and_fw_ind=True,
        payload="é" * (SIZE * n_segments // 2),
    )
    start = time.process_time()
    for _ in range(count):
        segments.split(message, size=SIZE, max_segments=64)
    return (time.process_time() - start) / count * 1e6


async def timed(work: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await work()
    return time.perf_counter() - wall, time.process_time() - cpu


async def reassembly(
    directory: Path, *, messages: int, n_segments: int, producers: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    parts = [
        segments.split(
            GatewayMessageDelivery(
                ori_addr=Address("AS", "as@iot"),
                dest_addr=Address.ue(f"dev{m % producers}@iot"),
                msg_id=f"m{m}",
                payload="x" * (SIZE * n_segments),
            ),
            size=SIZE,
            max_segments=64,
        )
        for m in range(messages)
    ]
    limits = StoreSettings(path=directory / "seg.db", max_bytes=2**34)
    store = await SqliteStore.open(limits)

    async def segmented() -> None:
        async def producer(p: int) -> None:
            for m in range(p, messages, producers):
                for part in parts[m]:
                    await segments.put_downlink_segment(
                        store,
                        part,
                        service_id=part.dest_addr.addr,
                        pipeline=1,
                        timeout=600,
                        max_segments=64,
                    )

        await asyncio.gather(*(producer(p) for p in range(producers)))

    try:
        seg = await timed(segmented)
        assert len(await store.due(Queue.DOWNLINK, limit=messages)) == producers
    finally:
        await store.close()

    plain_store = await SqliteStore.open(
        StoreSettings(path=directory / "plain.db", max_bytes=2**34)
    )
    body = {"kind": "message", "wire": parts[0][0].to_json()}

    async def plain() -> None:
        async def producer(p: int) -> None:
            for m in range(p, messages * n_segments, producers):
                key = f"k{m}"
                await plain_store.put(
                    Queue.DOWNLINK, msg_id=key, dedup_key=key, lane=f"dev{p}", body=body
                )

        await asyncio.gather(*(producer(p) for p in range(producers)))

    try:
        base = await timed(plain)
    finally:
        await plain_store.close()
    return seg, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--producers", type=int, default=64)
    args = parser.parse_args()
    configure(level="warning", fmt="console")
    print(f"split: {split_cost(2000, args.segments):.1f} us CPU per message of {args.segments}")
    with tempfile.TemporaryDirectory() as tmp:
        (s_wall, s_cpu), (b_wall, b_cpu) = asyncio.run(
            reassembly(
                Path(tmp),
                messages=args.messages,
                n_segments=args.segments,
                producers=args.producers,
            )
        )
    rows = args.messages * args.segments
    print(
        f"reassembly: {rows / s_wall:,.0f} segments/s, {args.messages / s_wall:,.0f} messages/s,"
        f" {s_cpu / rows * 1e6:.0f} us CPU per segment"
    )
    print(
        f"plain put of as many rows: {rows / b_wall:,.0f} rows/s,"
        f" {b_cpu / rows * 1e6:.0f} us CPU per row"
    )


if __name__ == "__main__":
    main()
