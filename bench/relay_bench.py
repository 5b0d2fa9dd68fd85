"""Throughput and latency of the whole relay, against a direct baseline in the same run.

Run: .venv/bin/python bench/relay_bench.py [--messages 4000] [--devices 64] [--concurrency 64]

relay:    HTTP device -> ``gatewayd run`` (a real process: store commit, 202, sender,
          mutual TLS) -> reference server. A message's latency runs from the device's
          POST to the moment the server has it (the server's ack follows at once);
          throughput is messages over first POST -> last arrival.
baseline: the same client posts the same messages (as the ``UEMessageDelivery`` bodies
          the gateway would send) straight to the reference server over mutual TLS, with
          the gateway's certificate; latency is POST -> the server's 200.

The client and the reference server share this process in both runs, so the ratio
shows what the gateway adds (a durable commit per message, a second hop, lane order).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_AS
from gatewayd_sim.server import SimServer
from loadgen import (
    GatewayProcess,
    device_tokens,
    percentile,
    write_gateway_config,
)

from gatewayd.log import configure
from gatewayd.msgin5g.model import Address, UEMessageDelivery
from gatewayd.security import tls


class _TimingSim(SimServer):
    """The reference server, noting when each uplink msgId first arrived."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.arrived: dict[str, float] = {}
        self.all_in = asyncio.Event()
        self.expect = 0

    async def _uplink(self, request: web.Request) -> web.StreamResponse:
        response = await super()._uplink(request)
        msg_id = self.uplinks[-1].message.msg_id if self.uplinks else ""
        if msg_id and msg_id not in self.arrived:
            self.arrived[msg_id] = time.monotonic()
            if len(self.arrived) >= self.expect:
                self.all_in.set()
        return response


Post = Callable[[aiohttp.ClientSession, int], Awaitable[None]]


async def _drive(
    count: int, concurrency: int, post: Post, session: aiohttp.ClientSession
) -> dict[int, float]:
    """``concurrency`` workers post messages 0..count-1; returns each one's start time."""
    started: dict[int, float] = {}
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            started[n] = time.monotonic()
            await post(session, n)

    async with asyncio.TaskGroup() as group:
        for w in range(concurrency):
            group.create_task(worker(), name=f"bench-client-{w}")
    return started


def _report(name: str, count: int, elapsed: float, latencies: list[float]) -> float:
    rate = count / elapsed
    print(
        f"{name:<9}{rate:>10.0f} msg/s   p50 {percentile(latencies, 0.5) * 1000:>7.1f} ms"
        f"   p99 {percentile(latencies, 0.99) * 1000:>7.1f} ms   ({count} in {elapsed:.2f} s)"
    )
    return rate


async def relay_run(
    args: argparse.Namespace, sim: _TimingSim, gw: GatewayProcess, tokens: dict[str, str]
) -> tuple[float, list[float]]:
    """Devices -> gateway -> server; (msg/s, latencies)."""
    names, payload = list(tokens), "x" * args.payload
    base = gw.url
    assert base is not None

    async def via_gateway(session: aiohttp.ClientSession, n: int) -> None:
        device = names[n % len(names)]
        async with session.post(
            f"{base}/v1/devices/{device}/messages",
            json={"payload": payload, "msgId": f"r-{n}"},
            headers={"Authorization": f"Bearer {tokens[device]}"},
        ) as resp:
            await resp.read()
            if resp.status != 202:
                raise RuntimeError(f"gateway answered {resp.status}")

    sim.expect = args.messages
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.monotonic()
        started = await _drive(args.messages, args.concurrency, via_gateway, session)
        await asyncio.wait_for(sim.all_in.wait(), 300)
    elapsed = max(sim.arrived.values()) - began
    latencies = [sim.arrived[f"r-{n}"] - t for n, t in started.items()]
    return _report("relay", args.messages, elapsed, latencies), latencies


async def baseline_run(
    args: argparse.Namespace, sim: _TimingSim, pki: harness.Pki, names: list[str]
) -> tuple[float, list[float]]:
    """The same client straight to the server over mutual TLS; (msg/s, latencies)."""
    payload = "x" * args.payload
    ctx = tls.client_context(pki.trust(), pki.identity("gateway"))
    latencies: list[float] = []

    async def direct(session: aiohttp.ClientSession, n: int) -> None:
        body = UEMessageDelivery(
            ori_addr=Address.ue(f"ue-{names[n % len(names)]}@iot.example"),
            dest_addr=Address("AS", DEMO_AS),
            msg_id=f"b-{n}",
            sto_and_fw_ind=True,
            payload=payload,
        ).to_json()
        t0 = time.monotonic()
        async with session.post(
            f"{sim.api_root}/msgs-msgdelivery/v1/deliver-ue-message", json=body
        ) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"server answered {resp.status}")
        latencies.append(time.monotonic() - t0)

    connector = aiohttp.TCPConnector(limit=args.concurrency, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.monotonic()
        await _drive(args.messages, args.concurrency, direct, session)
        elapsed = time.monotonic() - began
    return _report("baseline", args.messages, elapsed, latencies), latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--devices", type=int, default=64, help="lanes (one per device)")
    parser.add_argument("--concurrency", type=int, default=64, help="client requests in flight")
    parser.add_argument("--payload", type=int, default=120, help="payload bytes")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="the gateway's northbound.max_connections (default: the config default, 8)",
    )
    args = parser.parse_args()
    configure(level="warning")
    tokens = device_tokens(args.devices)

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        directory = Path(tmp)
        pki = harness.make_pki(directory / "pki")
        async with _TimingSim(harness.sim_settings(pki), schema_check=False) as sim:
            config = write_gateway_config(
                directory / "gw.toml", pki, api_root=sim.api_root, tokens=tokens
            )
            if args.max_connections is not None:
                # HTTP/1.1 has one request per connection at a time: this pool size, not
                # northbound.concurrency, bounds the requests in flight to the server.
                text = config.read_text().replace(
                    "\ntimeout = 5.0", f"\ntimeout = 5.0\nmax_connections = {args.max_connections}"
                )
                config.write_text(text)
            # The gateway logs as deployed (JSON, info: one line per relayed message),
            # to a file: that cost is part of the relay.
            gw = GatewayProcess(config, tokens, directory)
            await gw.start()
            try:
                await sim.wait_for(lambda: bool(sim.registrations), timeout=30)
                print(
                    f"{args.messages} messages, {args.devices} devices, "
                    f"{args.concurrency} client requests in flight, {args.payload}-byte payloads"
                )
                relay, relay_lat = await relay_run(args, sim, gw, tokens)
                baseline, direct_lat = await baseline_run(args, sim, pki, list(tokens))
                p50 = percentile(relay_lat, 0.5) / percentile(direct_lat, 0.5)
                print(f"ratio    relay/baseline throughput {relay / baseline:.2f}, p50 x{p50:.1f}")
                code, _ = await gw.terminate()
                if code != 0:
                    print(f"warning: gatewayd exited {code}")
            finally:
                await gw.ensure_dead()


if __name__ == "__main__":
    asyncio.run(main())
