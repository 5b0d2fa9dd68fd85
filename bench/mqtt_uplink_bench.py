"""Uplink benchmark: MQTT -> gatewayd-mqtt transport -> HTTPS POST, against a raw baseline.

Both legs run in one process against the same real mosquitto and the same local aiohttp
HTTPS server (mutual TLS, keep-alive). A device publishes N QoS 1 messages as fast as
its window allows; every message ends as one POST. Figures: messages/s from the first
publish to the last completed POST, and p50/p99 publish-to-POST-done latency (under a
saturating burst, so the latency includes queueing in the broker).

- ``gateway`` leg: :class:`MqttTransport` with a minimal context whose ``accept()``
  POSTs the message and returns once the server answered (PUBACK only after that).
  Swap :func:`gateway_leg` for the real gateway + reference server later.
- ``raw`` leg: a plain aiomqtt subscriber (automatic PUBACK) doing the same POSTs.

Usage: ``.venv/bin/python bench/mqtt_uplink_bench.py [-n 10000] [--qos 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import structlog
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins" / "gatewayd-mqtt" / "tests"))

from gatewayd_mqtt.transport import MqttTransport  # noqa: E402
from mosquitto import Mosquitto  # noqa: E402

from gatewayd import pki  # noqa: E402
from gatewayd.api import Acceptance, Options, TlsIdentity, TransportSettings, TrustAnchors, Uplink  # noqa: E402  # noqa: E402
from gatewayd.security.tls import client_context, server_context  # noqa: E402


@dataclass
class Sink:
    """Where every leg reports a finished message: its send time rides in the payload."""

    expected: int
    latencies: list[float] = field(default_factory=list)
    first_sent: float = 0.0
    last_done: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, sent: float) -> None:
        now = time.perf_counter()
        self.latencies.append(now - sent)
        self.last_done = now
        if len(self.latencies) >= self.expected:
            self.done.set()


@dataclass
class Env:
    broker: Mosquitto
    post: Callable[[bytes], Awaitable[None]]  # one HTTPS POST over the shared session
    qos: int


class Leg:
    async def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


# --- the gateway leg ----------------------------------------------------------------


class PostingContext:
    """A minimal TransportContext: accept() = POST the message, return when answered."""

    def __init__(self, env: Env, sink: Sink) -> None:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
        self.log = structlog.get_logger("bench")
        self.env, self.sink = env, sink

    def device(self, name: str) -> None:
        return None

    def credentials(self, name: str) -> Any:
        raise KeyError(name)

    async def accept(self, uplink: Uplink) -> Acceptance:
        body = json.dumps({"msgId": uplink.msg_id, "payload": uplink.payload}).encode()
        await self.env.post(body)
        self.sink.record(json.loads(uplink.payload or "{}")["t"])
        return Acceptance(msg_id=uplink.msg_id or "")

    async def accept_report(self, report: Any) -> None:
        return None


class GatewayLeg(Leg):
    def __init__(self, transport: MqttTransport, task: asyncio.Task[None]) -> None:
        self.transport, self.task = transport, task

    async def close(self) -> None:
        await self.transport.stop()
        await self.task


async def gateway_leg(env: Env, sink: Sink) -> Leg:
    settings = TransportSettings(
        name="bench",
        plugin="mqtt",
        options=Options(
            {
                "port": env.broker.port,
                "client_id": "bench-gw",
                "format": "json",
                "uplink_qos": env.qos,
                "receive_maximum": 100,
            },
            "transports.bench",
        ),
        base_dir=ROOT,
        service_id_template="{device}@bench",
    )
    transport = MqttTransport(settings, PostingContext(env, sink))  # type: ignore[arg-type]
    await transport.start()
    return GatewayLeg(transport, asyncio.create_task(transport.run(), name="transport:bench"))


# --- the raw baseline ---------------------------------------------------------------


class RawLeg(Leg):
    def __init__(self, client: aiomqtt.Client, task: asyncio.Task[None]) -> None:
        self.client, self.task = client, task

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)


async def raw_leg(env: Env, sink: Sink) -> Leg:
    client = aiomqtt.Client("127.0.0.1", env.broker.port, identifier="bench-raw")
    client.pending_calls_threshold = 10_000
    await client.__aenter__()
    await client.subscribe("devices/+/up", qos=env.qos)
    slots = asyncio.Semaphore(100)
    tasks: set[asyncio.Task[None]] = set()

    async def one(payload: bytes) -> None:
        try:
            envelope = json.loads(payload)
            await env.post(
                json.dumps({"msgId": envelope["msgId"], "payload": envelope["payload"]}).encode()
            )
            sink.record(json.loads(envelope["payload"])["t"])
        finally:
            slots.release()

    async def loop() -> None:
        async for message in client.messages:
            await slots.acquire()
            task = asyncio.create_task(one(bytes(message.payload)), name="raw-post")  # type: ignore[arg-type]
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return RawLeg(client, asyncio.create_task(loop(), name="raw-reader"))


# --- the harness --------------------------------------------------------------------


async def https_server(tmp: Path) -> tuple[web.AppRunner, int, ssl.SSLContext]:
    ca = pki.create_ca("bench CA")
    server = pki.issue(ca, "server", dns=("localhost",), ips=("127.0.0.1",))
    client = pki.issue(ca, "client", uris=("urn:bench:gw",))
    trust = TrustAnchors(ca_pem=ca.cert_pem)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "DELY_STORED"})

    app = web.Application()
    app.router.add_post("/deliver", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sctx = server_context(
        TlsIdentity(cert_chain_pem=server.cert_pem, key_pem=server.key_pem), trust
    )
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=sctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cctx = client_context(
        trust, TlsIdentity(cert_chain_pem=client.cert_pem, key_pem=client.key_pem)
    )
    return runner, port, cctx


async def publish(env: Env, n: int, sink: Sink, leg: str) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", env.broker.port, identifier=f"dev-{leg}", max_inflight_messages=20
    ) as dev:
        dev.pending_calls_threshold = 10_000
        slots = asyncio.Semaphore(200)
        sink.first_sent = time.perf_counter()

        async def one(i: int) -> None:
            async with slots:
                inner = json.dumps({"t": time.perf_counter()})
                body = json.dumps({"msgId": f"{leg}-{i}", "payload": inner})
                await dev.publish(f"devices/d{i % 100}/up", body, qos=env.qos, timeout=120)

        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(one(i), name=f"pub-{i}")


async def run_leg(
    name: str, make: Callable[[Env, Sink], Awaitable[Leg]], env: Env, n: int
) -> dict[str, float]:
    sink = Sink(expected=n)
    leg = await make(env, sink)
    try:
        await publish(env, n, sink, name)
        await asyncio.wait_for(sink.done.wait(), 300)
    finally:
        await leg.close()
    lat = sorted(sink.latencies)
    return {
        "msgs_per_s": n / (sink.last_done - sink.first_sent),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
    }


async def main(n: int, qos: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        broker = Mosquitto(tmp / "broker", max_inflight=100)
        broker.start()
        runner, port, cctx = await https_server(tmp)
        connector = aiohttp.TCPConnector(ssl=cctx, limit=100, keepalive_timeout=60)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                url = f"https://127.0.0.1:{port}/deliver"

                async def post(body: bytes) -> None:
                    async with session.post(
                        url, data=body, headers={"content-type": "application/json"}
                    ) as r:
                        await r.read()
                        r.raise_for_status()

                env = Env(broker, post, qos)
                results: dict[str, list[dict[str, float]]] = {"gateway": [], "raw": []}
                for _ in range(rounds):  # interleaved, so drift hits both legs alike
                    results["raw"].append(await run_leg("raw", raw_leg, env, n))
                    results["gateway"].append(await run_leg("gateway", gateway_leg, env, n))
        finally:
            await runner.cleanup()
            broker.stop()
    best = {k: max(v, key=lambda r: r["msgs_per_s"]) for k, v in results.items()}
    print(f"uplink, {n} QoS {qos} messages, best of {rounds} rounds")
    for name in ("raw", "gateway"):
        r = best[name]
        print(
            f"  {name:8s} {r['msgs_per_s']:8.0f} msg/s   p50 {r['p50_ms']:7.1f} ms"
            f"   p99 {r['p99_ms']:7.1f} ms"
        )
    ratio = best["gateway"]["msgs_per_s"] / best["raw"]["msgs_per_s"]
    print(f"  ratio gateway/raw throughput: {ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.qos, args.rounds))
