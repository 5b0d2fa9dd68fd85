"""Uplink benchmark: MQTT -> the real gateway -> the reference server, against a raw baseline.

Both legs run in one process against the same real mosquitto and the same reference
MSGin5G Server (:class:`SimServer`, mutual TLS, keep-alive). A device publishes N QoS 1
messages as fast as its window allows; every message ends as one
``POST /deliver-ue-message`` that the server records. Figures: messages/s from the first
publish to the last message the server recorded, and p50/p99 publish-to-recorded latency
(under a saturating burst, so the latency includes queueing in the broker and gateway).

- ``gateway`` leg: a complete gateway (:class:`gatewayd.daemon.Gateway`, in this event
  loop) with the ``mqtt`` transport: durable store (SQLite, ``synchronous=full``),
  PUBACK after the commit, registration, senders, JSON logs at ``--log-level``
  (formatted, then written to /dev/null).
- ``raw`` leg: a plain aiomqtt subscriber (automatic PUBACK, nothing stored) making the
  same mTLS POSTs with the gateway's certificate, after registering the same UE ids.

Usage: ``.venv/bin/python bench/mqtt_uplink_bench.py [-n 10000] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiomqtt
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins" / "gatewayd-mqtt" / "tests"))

from gatewayd_sim import harness  # noqa: E402
from gatewayd_sim.server import SimServer  # noqa: E402
from mosquitto import Mosquitto  # noqa: E402

from gatewayd import log as logmod  # noqa: E402
from gatewayd.msgin5g import Address, GatewayRegistration, UEMessageDelivery  # noqa: E402
from gatewayd.msgin5g.registration import API_NAME, API_VERSION  # noqa: E402
from gatewayd.pki import DEMO_GATEWAY_ID  # noqa: E402
from gatewayd.security.tls import client_context  # noqa: E402

DEVICES = 100


def service_id(i: int) -> str:
    return f"ue-d{i}@bench.example"


@dataclass
class Sink:
    """Where the server reports a recorded message: its send time rides in the payload."""

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


class BenchServer(SimServer):
    """The reference server, telling the current sink about every new uplink."""

    sink: Sink | None = None

    async def _uplink(self, request: web.Request) -> web.StreamResponse:
        before = len(self.uplinks)
        response = await super()._uplink(request)
        if self.sink is not None and len(self.uplinks) > before:
            self.sink.record(json.loads(self.uplinks[-1].message.payload or "{}")["t"])
        return response


@dataclass
class Env:
    broker: Mosquitto
    server: BenchServer
    tls: harness.Pki
    tmp: Path
    qos: int
    log_level: str


class Leg:
    async def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


# --- the gateway leg ----------------------------------------------------------------


def mqtt_tables(env: Env, state: str) -> str:
    devices = "".join(
        f'\n[[transports.field.devices]]\ndevice = "d{i}"\nservice_id = "{service_id(i)}"\n'
        for i in range(DEVICES)
    )
    return f"""
[log]
level = "{env.log_level}"

[transports.field]
plugin = "mqtt"
host = "127.0.0.1"
port = {env.broker.port}
client_id = "bench-gw-{state}"
uplink_qos = {env.qos}
receive_maximum = 100
{devices}"""


class GatewayLeg(Leg):
    def __init__(self, stack: Callable[[], Awaitable[None]]) -> None:
        self._exit = stack

    async def close(self) -> None:
        await self._exit()


async def gateway_leg(env: Env, tag: str) -> Leg:
    text = harness.gateway_toml(
        env.tls,
        api_root=env.server.api_root,
        state_dir=env.tmp / f"state-{tag}",
        transports=mqtt_tables(env, tag),
    )
    settings = harness.write_config(env.tmp / f"gatewayd-{tag}.toml", text)
    cm = harness.running(settings)
    gw = await cm.__aenter__()
    # The transport connects in the background; wait so the burst measures the pipeline.
    transport = gw.transports["field"]
    await env.server.wait_for(lambda: bool(env.server.registrations), timeout=10)
    async with asyncio.timeout(10):
        while not transport.connected:  # type: ignore[attr-defined]  # noqa: ASYNC110 - a flag
            await asyncio.sleep(0.01)

    async def close() -> None:
        await cm.__aexit__(None, None, None)

    return GatewayLeg(close)


# --- the raw baseline ---------------------------------------------------------------


async def raw_leg(env: Env, tag: str) -> Leg:
    """Subscribe, and turn every message into the same UEMessageDelivery POST."""
    ctx = client_context(env.tls.trust(), env.tls.identity("gateway"))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=100, keepalive_timeout=60)
    )
    root = env.server.api_root
    registration = GatewayRegistration(
        gw_id=DEMO_GATEWAY_ID,
        gw_type="N3G",
        target_uri="https://127.0.0.1:9/",  # never called: no report is requested
        ue_svc_ids=tuple(service_id(i) for i in range(DEVICES)),
    )
    async with session.post(
        f"{root}/{API_NAME}/{API_VERSION}/registrations", json=registration.to_json()
    ) as r:
        r.raise_for_status()
    url = f"{root}/msgs-msgdelivery/v1/deliver-ue-message"
    client = aiomqtt.Client("127.0.0.1", env.broker.port, identifier=f"bench-raw-{tag}")
    client.pending_calls_threshold = 10_000
    await client.__aenter__()
    await client.subscribe("devices/+/up", qos=env.qos)
    slots = asyncio.Semaphore(100)
    tasks: set[asyncio.Task[None]] = set()

    async def one(topic: str, payload: bytes) -> None:
        try:
            envelope = json.loads(payload)
            device = int(topic.split("/")[1][1:])
            message = UEMessageDelivery(
                ori_addr=Address.ue(service_id(device)),
                dest_addr=Address("AS", harness.DEMO_AS),
                msg_id=envelope["msgId"],
                sto_and_fw_ind=True,
                payload=envelope["payload"],
            )
            async with session.post(url, json=message.to_json()) as r:
                await r.read()
                r.raise_for_status()
        finally:
            slots.release()

    async def loop() -> None:
        async for message in client.messages:
            await slots.acquire()
            task = asyncio.create_task(
                one(message.topic.value, bytes(message.payload)),  # type: ignore[arg-type]
                name="raw-post",
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    reader = asyncio.create_task(loop(), name="raw-reader")

    class RawLeg(Leg):
        async def close(self) -> None:
            reader.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)
            await client.__aexit__(None, None, None)
            await session.close()

    return RawLeg()


# --- the harness --------------------------------------------------------------------


async def publish(env: Env, n: int, sink: Sink, tag: str) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", env.broker.port, identifier=f"dev-{tag}", max_inflight_messages=20
    ) as dev:
        dev.pending_calls_threshold = 10_000
        slots = asyncio.Semaphore(200)
        sink.first_sent = time.perf_counter()

        async def one(i: int) -> None:
            async with slots:
                inner = json.dumps({"t": time.perf_counter()})
                body = json.dumps({"msgId": f"{tag}-{i}", "payload": inner})
                await dev.publish(f"devices/d{i % DEVICES}/up", body, qos=env.qos, timeout=120)

        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(one(i), name=f"pub-{i}")


async def run_leg(
    name: str, make: Callable[[Env, str], Awaitable[Leg]], env: Env, n: int, tag: str
) -> dict[str, float]:
    sink = Sink(expected=n)
    leg = await make(env, tag)
    env.server.sink = sink
    # CPU time of the whole process (device, broker client, gateway or raw leg, server):
    # on shared cores wall-clock rates swing with the neighbours, CPU per message less.
    cpu = time.process_time()
    try:
        await publish(env, n, sink, tag)
        await asyncio.wait_for(sink.done.wait(), 600)
        cpu = time.process_time() - cpu
    finally:
        env.server.sink = None
        await leg.close()
    lat = sorted(sink.latencies)
    return {
        "msgs_per_s": n / (sink.last_done - sink.first_sent),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
        "cpu_ms": 1000 * cpu / n,
    }


def quiet_logs(level: str) -> None:
    """The gateway's JSON logs, fully formatted, into /dev/null (a terminal would be the
    bottleneck); the reference server logs through the same configuration."""
    logmod.configure(level, "json")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(devnull)


async def main(n: int, qos: int, rounds: int, log_level: str) -> None:
    quiet_logs(log_level)
    results: dict[str, list[dict[str, float]]] = {"gateway": [], "raw": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tls = harness.make_pki(tmp / "pki")
        broker = Mosquitto(tmp / "broker", max_inflight=100)
        broker.start()
        settings = harness.sim_settings(tls, service_ids=("ue-*",))
        try:
            async with BenchServer(settings) as server:
                env = Env(broker, server, tls, tmp, qos, log_level)
                for r in range(rounds):  # interleaved, so drift hits both legs alike
                    results["raw"].append(await run_leg("raw", raw_leg, env, n, f"raw{r}"))
                    results["gateway"].append(
                        await run_leg("gateway", gateway_leg, env, n, f"gw{r}")
                    )
        finally:
            broker.stop()
    best = {k: max(v, key=lambda r: r["msgs_per_s"]) for k, v in results.items()}
    print(f"uplink, {n} QoS {qos} messages, best of {rounds} rounds, gateway log {log_level}")
    for name in ("raw", "gateway"):
        r = best[name]
        print(
            f"  {name:8s} {r['msgs_per_s']:8.0f} msg/s   p50 {r['p50_ms']:7.1f} ms"
            f"   p99 {r['p99_ms']:7.1f} ms   CPU {r['cpu_ms']:5.2f} ms/msg"
        )
    ratio = best["gateway"]["msgs_per_s"] / best["raw"]["msgs_per_s"]
    print(f"  ratio gateway/raw throughput: {ratio:.2f}")
    extra = best["gateway"]["cpu_ms"] - best["raw"]["cpu_ms"]
    print(f"  gateway CPU over raw: {extra:+.2f} ms/msg (store, logs, sender, PUBACK after commit)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    args = parser.parse_args()
    asyncio.run(main(args.n, args.qos, args.rounds, args.log_level))
