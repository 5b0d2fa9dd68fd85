"""SMPP throughput: MT and MO messages per second through the smpp transport, against a
bare ESME driving the same SMSC in the same run.

Run: .venv/bin/python bench/smpp_bench.py [--messages 3000] [--window 10] [--binds 1 4]
     [--receipts]

The SMSC is the strict test peer (``plugins/gatewayd-smpp/tests/strict_smsc.py``, on
Jasmin's codec smpp.pdu3) in a process of its own, so its CPU does not count against the
ESME side. Per bind count:

peer alone: a bare ESME (pre-encoded PDUs, no decoding beyond the header) binds
            ``binds`` times, keeps ``window`` submit_sm in flight per bind, and answers
            each deliver_sm at once: the most the SMSC itself can do.
transport:  SmppTransport with ``binds`` binds and ``window``: MT is ``deliver()`` of
            single-part downlinks, its durable submit bookkeeping in a real SQLite store
            (``context.kv``). Receipts off (the outcome is the submit_sm_resp) unless
            ``--receipts``: then the SMSC sends a DELIVRD receipt right after each
            submit_sm_resp, and the outcome waits for it (the peer-alone run does not
            ask for receipts). MO is deliver_sm from the SMSC through intake into an
            in-memory context.

Rates are messages over first send -> last response; CPU is this process's user+sys
time per message (the SMSC's process is not counted). ``commits/MT`` is the store's
transactions per MT message (``Store.stats()["commits"]``): concurrent kv calls share
a transaction, so it is below the kv calls an MT makes one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "plugins" / "gatewayd-smpp" / "tests"
sys.path.insert(0, str(TESTS))
os.environ.setdefault("SMPP_TEST_PASSWORD", "s3cret")

from conftest import SmsContext, base_options, make_settings  # noqa: E402
from gatewayd_smpp.pdu import Bind, Command, Pdu, ShortMessage  # noqa: E402
from gatewayd_smpp.transport import SmppTransport  # noqa: E402

from gatewayd.api import Address, Device, Downlink  # noqa: E402
from gatewayd.store import SqliteStore, Store, StoreSettings  # noqa: E402
from gatewayd.store.kv import StoreKV  # noqa: E402

DEVICE = "447700900001"

PEER = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from strict_smsc import StrictSmsc

async def main() -> None:
    smsc = StrictSmsc()
    smsc.auto_receipt = "DELIVRD" if sys.argv[2] == "receipts" else None
    await smsc.start()
    print(smsc.port, flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        count, window = json.loads(line)
        sem = asyncio.Semaphore(window)
        async def one(i: int) -> None:
            async with sem:
                await smsc.deliver(source="447700900001", short_message=b"mo %d" % i)
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        print(json.dumps(time.perf_counter() - started), flush=True)
    await smsc.stop()

asyncio.run(main())
"""


class Peer:
    """The SMSC in a subprocess; :meth:`mo` makes it send MO messages and time them."""

    async def start(self, *, receipts: bool) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PEER,
            str(TESTS),
            "receipts" if receipts else "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.port = int(await self.proc.stdout.readline())

    async def mo(self, count: int, window: int) -> float:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([count, window]).encode() + b"\n")
        await self.proc.stdin.drain()
        return float(json.loads(await self.proc.stdout.readline()))

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


def cpu() -> float:
    t = os.times()
    return t.user + t.system


class BareEsme:
    """The least an ESME can do: pre-encoded PDUs, responses matched by count only."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.resp = Pdu(Command.DELIVER_SM_RESP, 0, 0, b"\x00")

    async def bind(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        # The test SMSC takes any password; this one only fills the field.
        body = Bind(system_id="bare", password="x").encode()  # noqa: S106
        writer.write(Pdu(Command.BIND_TRANSCEIVER, 0, 1, body).encode())
        await self._read(reader)
        return reader, writer

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, int]:
        head = await reader.readexactly(16)
        length, command, _status, sequence = struct.unpack(">IIII", head)
        await reader.readexactly(length - 16)
        return command, sequence

    async def mt(self, count: int, window: int, binds: int) -> float:
        body = ShortMessage(
            source_addr="4000",
            dest_addr_ton=1,
            dest_addr_npi=1,
            destination_addr=DEVICE,
            short_message=b"bench",
        ).encode()
        links = [await self.bind() for _ in range(binds)]
        share = [count // binds + (1 if i < count % binds else 0) for i in range(binds)]

        async def drive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            sent = done = 0
            while done < n:
                while sent < n and sent - done < window:
                    sent += 1
                    writer.write(Pdu(Command.SUBMIT_SM, 0, sent + 1, body).encode())
                await self._read(reader)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(drive(r, w, n) for (r, w), n in zip(links, share, strict=True)))
        elapsed = time.perf_counter() - started
        for _, writer in links:
            writer.close()
        return elapsed

    async def answer_mo(self, stop: asyncio.Event) -> None:
        reader, writer = await self.bind()
        try:
            while not stop.is_set():
                command, sequence = await self._read(reader)
                if command == Command.DELIVER_SM:
                    writer.write(Pdu(Command.DELIVER_SM_RESP, 0, sequence, b"\x00").encode())
        finally:
            writer.close()


async def through_transport(
    peer: Peer, store: Store, count: int, window: int, binds: int, *, receipts: bool
) -> dict[str, Any]:
    options = base_options(peer.port, window=window, binds=binds, receipts=receipts)
    settings = make_settings(options, [DEVICE])
    context = SmsContext(settings.devices)
    context.kv = StoreKV(store, f"bench{binds}")  # type: ignore[assignment]
    transport = SmppTransport(settings, context)
    await transport.start()
    for link in transport.links:
        await asyncio.wait_for(link.bound.wait(), 10)
    device = Device(name=DEVICE, service_id="ue@bench")
    origin = Address("AS", "as@bench")
    sem = asyncio.Semaphore(window * binds * 2)

    async def one(i: int) -> bool:
        async with sem:
            message = Downlink(
                msg_id=f"b{binds}-{i}", device=device, origin=origin, payload="bench"
            )
            return (await transport.deliver(message)).delivered

    commits = (await store.stats())["commits"]
    cpu0, started = cpu(), time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    mt_elapsed, mt_cpu = time.perf_counter() - started, cpu() - cpu0
    # Less the stats call's own transaction.
    commits = (await store.stats())["commits"] - commits - 1
    assert all(results), "an MT message failed"

    cpu0 = cpu()
    mo_elapsed = await peer.mo(count, window)
    await context.wait_for(count, timeout=120)
    mo_cpu = cpu() - cpu0
    await transport.stop()
    return {
        "mt_per_s": count / mt_elapsed,
        "mt_cpu_us": mt_cpu / count * 1e6,
        "mt_commits": commits / count,
        "mo_per_s": count / mo_elapsed,
        "mo_cpu_us": mo_cpu / count * 1e6,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--binds", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--receipts", action="store_true", help="MT waits for receipts")
    args = parser.parse_args()
    peer = Peer()
    await peer.start(receipts=args.receipts)
    with tempfile.TemporaryDirectory() as tmp:
        store = await SqliteStore.open(StoreSettings(path=Path(tmp) / "bench.db"))
        try:
            for binds in args.binds:
                bare = BareEsme(peer.port)
                mt_alone = await bare.mt(args.messages, args.window, binds)
                stop = asyncio.Event()
                answering = asyncio.create_task(bare.answer_mo(stop))
                await asyncio.sleep(0.2)
                mo_alone = await peer.mo(args.messages, args.window)
                stop.set()
                answering.cancel()
                await asyncio.gather(answering, return_exceptions=True)
                await asyncio.sleep(0.2)
                got = await through_transport(
                    peer, store, args.messages, args.window, binds, receipts=args.receipts
                )
                print(
                    f"binds={binds} window={args.window} messages={args.messages}"
                    f"{' receipts' if args.receipts else ''}: "
                    f"MT {got['mt_per_s']:.0f}/s ({got['mt_cpu_us']:.0f} us CPU/msg, "
                    f"{got['mt_commits']:.2f} commits/MT) "
                    f"vs peer alone {args.messages / mt_alone:.0f}/s; "
                    f"MO {got['mo_per_s']:.0f}/s ({got['mo_cpu_us']:.0f} us CPU/msg) "
                    f"vs peer alone {args.messages / mo_alone:.0f}/s",
                    flush=True,
                )
        finally:
            await store.close()
            await peer.stop()


if __name__ == "__main__":
    asyncio.run(main())
