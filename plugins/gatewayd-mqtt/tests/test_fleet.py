"""The fleet test of issue 9: one bad device never stops the others.

Fifty devices send normally, half over MQTT (mosquitto, the gateway's persistent
session) and half over HTTP (bearer tokens). Meanwhile bad devices send every kind of
bad input over both, an unlisted device the server refuses publishes, the store's disk
fills and empties, and the reference server restarts without its registrations. Then:

- the normal devices' traffic kept flowing throughout, each device's messages reached
  the server in the order it sent them, and nothing acknowledged was lost (MQTT: the
  broker's PUBACK to the device, the broker keeping everything, ``max_queued_messages
  0``; HTTP: the gateway's 202);
- each bad input is visible in the log, in a metric and, being a message, in the
  dead-letter queue.

The CI variant runs ~1 minute; ``--long`` runs a bigger fleet for longer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import pytest_asyncio
import structlog
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway, until
from loadgen import LoadGen, bearer_devices, device_url, export_tokens
from mosquitto import Mosquitto
from mqtt_helpers import device_client

from gatewayd import config, metrics
from gatewayd.store import Queue

PAST = (datetime.now(UTC) - timedelta(hours=1)).isoformat()


@dataclasses.dataclass(frozen=True)
class Size:
    devices: int  # per transport
    per_device: int
    interval: float  # seconds between one device's messages


CI = Size(devices=25, per_device=30, interval=1.0)
LONG = Size(devices=25, per_device=60, interval=0.5)


@pytest_asyncio.fixture
async def sim(loopback_pki: Pki) -> AsyncIterator[SimServer]:
    """Allows the fleet (sensors over MQTT, ``dev*`` over HTTP); ``rogue-*`` is refused."""
    settings = harness.sim_settings(loopback_pki, service_ids=("ue-sensor-*", "ue-dev*"))
    async with SimServer(settings, schema_check=True) as server:
        yield server


def transports(broker: Mosquitto, tokens: dict[str, str]) -> str:
    return f"""
[transports.field]
plugin = "mqtt"
host = "127.0.0.1"
port = {broker.port}
client_id = "gw-fleet"
service_id_template = "ue-{{device}}@iot.example"
max_payload = 4096
connect_timeout = 3.0
reconnect_initial = 0.05
reconnect_max = 0.5

[transports.web]
plugin = "http"
listen = "127.0.0.1:0"
max_body = 1000000
{bearer_devices(tokens)}
"""


BAD_MQTT = {  # topic device "sensor-bad" (learned, allowed by no rule: still invalid first)
    "lone surrogate payload": json.dumps({"msgId": "bm-1", "payload": "\ud800"}),
    "lone surrogate msgId": json.dumps({"msgId": "bm-\udfff", "payload": "p"}),
    "not json": "{not json",
    "oversize": json.dumps({"msgId": "bm-3", "payload": "x" * 5000}),
    "expiry in the past": json.dumps({"msgId": "bm-4", "payload": "p", "expiry": PAST}),
}
BAD_HTTP = {
    "deep nesting": b"[" * 50_000 + b"]" * 50_000,
    "lone surrogate": b'{"payload": "\\ud800", "msgId": "bh-1"}',
    "not json": b"{not json",
    "expiry in the past": json.dumps({"msgId": "bh-3", "payload": "p", "expiry": PAST}).encode(),
}


async def mqtt_device(client: object, name: str, size: Size, acked: list[str]) -> None:
    """Publish in order, each after the last one's PUBACK (from the broker)."""
    for seq in range(size.per_device):
        msg_id = f"{name}-{seq:04d}"
        body = json.dumps({"msgId": msg_id, "payload": f"{seq}"})
        await client.publish(f"devices/{name}/up", body, qos=1, timeout=120)  # type: ignore[attr-defined]
        acked.append(msg_id)
        await asyncio.sleep(size.interval)


async def bad_http(base: str, token: str) -> list[int]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    statuses = []
    async with aiohttp.ClientSession() as session:
        for body in BAD_HTTP.values():
            async with session.post(
                f"{base}/v1/devices/devbad/messages", data=body, headers=headers
            ) as resp:
                statuses.append(resp.status)
    return statuses


REJECTION_METRICS = (
    ("field", "invalid_message"),
    ("field", "not_json"),
    ("field", "oversize"),
    ("field", "device_refused"),
    ("web", "invalid_body"),
    ("web", "invalid_message"),
)


def rejection_counts() -> dict[tuple[str, str], float]:
    return {
        (t, r): metrics.value("gatewayd_intake_rejected_total", transport=t, reason=r)
        for t, r in REJECTION_METRICS
    }


async def misbehave(
    gw: object, bad: object, logs: list[dict[str, object]], token: str
) -> list[int]:
    """Every kind of bad input over MQTT and HTTP, and a device the server refuses."""
    for payload in BAD_MQTT.values():
        await bad.publish("devices/sensor-bad/up", payload, qos=1)  # type: ignore[attr-defined]
    await bad.publish("devices/rogue-1/up", json.dumps({"msgId": "r-1"}), qos=1)  # type: ignore[attr-defined]
    statuses = await bad_http(device_url(gw)(), token)
    await until(lambda: any(e["event"] == "device.refused" for e in logs), 20)
    await bad.publish("devices/rogue-1/up", json.dumps({"msgId": "r-2"}), qos=1)  # type: ignore[attr-defined]
    return statuses


async def fill_and_empty_disk(gw: object, logs: list[dict[str, object]]) -> None:
    store = gw.store  # type: ignore[attr-defined]
    await store.limit_size((await store.stats())["db_bytes"] + 8192)
    await until(lambda: any(e["event"] == "store.full" for e in logs), 30)
    await asyncio.sleep(2.0)
    await store.limit_size(None)


def check_rejections(
    logs: list[dict[str, object]],
    intake: list[object],
    dead_up: list[object],
    before: dict[tuple[str, str], float],
) -> None:
    """Each bad input: refused for good, in the log, a metric and the DLQ."""
    by_device: dict[str, list[str]] = {}
    for event in logs:
        if event["event"] == "intake.rejected":
            by_device.setdefault(str(event["device"]), []).append(str(event["reason"]))
    assert sorted(by_device["sensor-bad"]) == sorted(
        ["invalid_message", "invalid_message", "not_json", "oversize", "invalid_message"]
    )
    assert sorted(by_device["devbad"]) == [
        "invalid_body",
        "invalid_body",
        "invalid_body",
        "invalid_message",
    ]
    assert by_device["rogue-1"] == ["device_refused"]
    recorded = sorted((i.body["device"], i.body["reason"]) for i in intake)  # type: ignore[attr-defined]
    assert recorded == sorted(
        [("sensor-bad", r) for r in by_device["sensor-bad"]]
        + [("devbad", r) for r in by_device["devbad"]]
        + [("rogue-1", "device_refused")]
    )
    assert [i.msg_id for i in dead_up] == ["r-1"]  # type: ignore[attr-defined] # stored before the refusal
    grown = {key: value - before[key] for key, value in rejection_counts().items()}
    assert grown == {
        ("field", "invalid_message"): 3,
        ("field", "not_json"): 1,
        ("field", "oversize"): 1,
        ("field", "device_refused"): 1,
        ("web", "invalid_body"): 3,
        ("web", "invalid_message"): 1,
    }
    assert not [e for e in logs if e["event"] in ("task.crashed", "registration.refused")]


def arrival_order(sims: list[SimServer]) -> dict[str, list[str]]:
    """msgIds per device in the order they first reached the server."""
    seen: set[str] = set()
    order: dict[str, list[str]] = {}
    for sim in sims:
        for uplink in sim.uplinks:
            msg_id = uplink.message.msg_id
            if msg_id in seen:
                continue  # a resend (the server restarted under a request in flight)
            seen.add(msg_id)
            order.setdefault(msg_id.rsplit("-", 1)[0], []).append(msg_id)
    return order


async def restart(sim: SimServer) -> SimServer:
    """Stop the server and start a new one on its port, without its registrations."""
    port = sim.port
    await sim.stop()
    await asyncio.sleep(1.5)
    fresh = SimServer(dataclasses.replace(sim.settings, port=port), schema_check=True)
    await fresh.start()
    return fresh


async def run_fleet(
    size: Size,
    broker: Mosquitto,
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = export_tokens(monkeypatch, size.devices)
    bad_token = "tok-devbad-000000"
    monkeypatch.setenv("GATEWAYD_LOADGEN_TOKEN_DEVBAD", bad_token)
    settings = gateway_config(transports(broker, {**tokens, "devbad": bad_token}))
    mqtt_names = [f"sensor-{i}" for i in range(size.devices)]
    rejected_before = rejection_counts()
    sims = [sim]
    mqtt_acked: list[str] = []
    flowing: list[tuple[str, int]] = []  # (phase, uplinks the servers had by then)

    def delivered() -> int:
        return sum(len(s.uplinks) for s in sims)

    with structlog.testing.capture_logs() as logs:
        async with (
            running_gateway(settings) as gw,
            device_client(broker, "fleet") as fleet,
            device_client(broker, "bad") as bad,
        ):
            await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
            field = gw.transports["field"]  # read again after the stop, when it is gone
            await until(lambda: field.connected, timeout=10)  # type: ignore[attr-defined]
            load = LoadGen(
                device_url(gw),
                tokens,
                per_device=size.per_device,
                rate=size.devices / size.interval,
            )
            traffic = [
                asyncio.create_task(mqtt_device(fleet, n, size, mqtt_acked), name=f"dev:{n}")
                for n in mqtt_names
            ]
            http = asyncio.create_task(load.run(), name="loadgen")

            # 1. Bad input of every kind, over both transports, and an unlisted device.
            await asyncio.sleep(2 * size.interval)
            flowing.append(("bad input", delivered()))
            http_bad = await misbehave(gw, bad, logs, bad_token)

            # 2. The disk fills, and empties.
            await asyncio.sleep(2 * size.interval)
            flowing.append(("disk full", delivered()))
            await fill_and_empty_disk(gw, logs)

            # 3. The server restarts, without its registrations.
            await asyncio.sleep(2 * size.interval)
            flowing.append(("server restart", delivered()))
            fresh = await restart(sim)
            sims.append(fresh)
            try:
                await asyncio.gather(*traffic)
                stats = await http
                expected = set(mqtt_acked) | stats.acked
                await until(
                    lambda: expected <= {m for ids in arrival_order(sims).values() for m in ids},
                    timeout=120,
                )
                flowing.append(("end", delivered()))
                intake = await gw.store.list_items(queue=Queue.INTAKE, state="dead", limit=100)
                dead_up = await gw.store.list_items(queue=Queue.UPLINK, state="dead", limit=100)
            finally:
                await fresh.stop()

    # Nothing acknowledged lost, and every device's order kept.
    sent = size.devices * size.per_device
    assert len(mqtt_acked) == sent
    assert len(stats.acked) == sent
    assert not stats.given_up
    order = arrival_order(sims)
    for name in [*mqtt_names, *tokens]:
        assert order[name] == sorted(order[name]), f"{name} out of order: {order[name]}"
        assert len(order[name]) == size.per_device
    # Normal traffic flowed through every phase (each later mark saw more delivered),
    # and the full disk was felt (503s over HTTP, refusals held unacked over MQTT).
    assert all(b > a for (_, a), (_, b) in itertools.pairwise(flowing)), flowing
    refusals = field.stats.refusals  # type: ignore[attr-defined]
    assert stats.statuses[503] + refusals > 0
    assert http_bad == [400, 400, 400, 400]
    check_rejections(logs, intake, dead_up, rejected_before)


async def test_fleet_keeps_flowing_while_bad_devices_misbehave(
    broker: Mosquitto,
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    await run_fleet(CI, broker, sim, gateway_config, monkeypatch)
    assert time.monotonic() - started < 150


@pytest.mark.slow
async def test_fleet_long(
    broker: Mosquitto,
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await run_fleet(LONG, broker, sim, gateway_config, monkeypatch)
