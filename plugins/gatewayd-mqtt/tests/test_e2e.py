"""The N3G role over MQTT, end to end: device -> mosquitto -> the real gateway -> the
reference MSGin5G Server, and back.

Every leg is real: the gateway runs in-process with its store, registrar and senders;
the gateway's MQTT link is TLS with the client certificate of an ``x509`` credential
backend; the server validates every body against the 3GPP OpenAPI files and refuses
uplinks from UE Service IDs the gateway has not registered.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable

import aiomqtt
import pytest
import pytest_asyncio
from aiohttp import web
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_AS, Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway, until
from mosquitto import Mosquitto
from mqtt_helpers import LONG_BURST, device_client, publish_all, publish_stubbornly

from gatewayd import config, pki
from gatewayd.pki import DEMO_GATEWAY_ID

TEMPLATE = "ue-{device}@iot.example"
SENSOR = "ue-sensor-1@iot.example"
CI_BURST = 800  # two shared cores, several engineers: moderate unless --long


class RecordingSim(SimServer):
    """The reference server, plus a timeline of registrations and uplink arrivals.

    The server already refuses an uplink from an unregistered UE; the timeline lets a
    test show the order itself: when each request *arrived*, what was registered.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.registered_at: list[tuple[float, frozenset[str]]] = []
        # (arrival time, oriAddr, msgId, was oriAddr registered at arrival?)
        self.uplink_arrivals: list[tuple[float, str, str, bool]] = []

    def _served(self) -> frozenset[str]:
        return frozenset(i for r in self.registrations for i in r.ue_svc_ids)

    async def _register(self, request: web.Request) -> web.StreamResponse:
        response = await super()._register(request)
        self.registered_at.append((time.monotonic(), self._served()))
        return response

    async def _update(self, request: web.Request) -> web.StreamResponse:
        response = await super()._update(request)
        self.registered_at.append((time.monotonic(), self._served()))
        return response

    async def _uplink(self, request: web.Request) -> web.StreamResponse:
        # aiohttp caches the body, so the real handler reads it again unchanged.
        body = await request.json()
        ori = body["oriAddr"]["addr"]
        self.uplink_arrivals.append((time.monotonic(), ori, body["msgId"], ori in self._served()))
        return await super()._uplink(request)


@pytest_asyncio.fixture
async def sim(loopback_pki: Pki) -> AsyncIterator[RecordingSim]:
    """Overrides the test kit's ``sim`` (so ``gateway_config`` points at this one)."""
    async with RecordingSim(harness.sim_settings(loopback_pki), schema_check=True) as server:
        yield server


def mqtt_tables(
    broker: Mosquitto,
    *,
    protocol: str = "5",
    client_id: str = "gw-e2e",
    static: bool = True,
    extra: str = "",
) -> str:
    """A TLS MQTT transport whose client certificate comes from an x509 backend."""
    cert, key = pki.write_pair(broker.dir, "gateway-client", broker.certs.gateway)
    devices = (
        f"""
[[transports.field.devices]]
device = "sensor-1"
service_id = "{SENSOR}"
"""
        if static
        else ""
    )
    return f"""
[credentials.broker]
plugin = "x509"
cert = "{cert}"
key = "{key}"
ca = "{broker.certs.ca_file}"

[transports.field]
plugin = "mqtt"
host = "127.0.0.1"
port = {broker.tls_port}
tls = "broker"
protocol = "{protocol}"
client_id = "{client_id}"
service_id_template = "{TEMPLATE}"
connect_timeout = 3.0
reconnect_initial = 0.05
reconnect_max = 0.5
{extra}
{devices}"""


async def next_json(client: aiomqtt.Client, topic: str, timeout: float = 10.0) -> dict[str, object]:
    """The next message on ``topic`` (others are skipped), decoded."""
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            if message.topic.matches(topic):
                assert isinstance(message.payload, bytes)
                decoded: dict[str, object] = json.loads(message.payload)
                return decoded
    raise AssertionError("message stream ended")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_uplink_and_downlink_with_reports(
    broker: Mosquitto,
    sim: RecordingSim,
    gateway_config: Callable[..., config.Settings],
    protocol: str,
) -> None:
    v5 = protocol == "5"
    settings = gateway_config(mqtt_tables(broker, protocol=protocol))
    async with (
        running_gateway(settings) as gw,
        device_client(broker, "sensor-1", v5=v5, tls=True) as dev,
    ):
        await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
        (reg,) = sim.registrations
        assert (reg.gw_id, reg.gw_type) == (DEMO_GATEWAY_ID, "N3G")
        assert reg.ue_svc_ids == (SENSOR,)  # the mapping's static device
        await until(lambda: gw.transports["field"].connected, timeout=10)  # type: ignore[attr-defined]
        await dev.subscribe("devices/sensor-1/report", qos=1)
        await dev.subscribe("devices/sensor-1/down", qos=1)

        # Uplink with a report request: device -> broker -> gateway -> server.
        envelope = {"msgId": "up-1", "payload": "t=21.5", "deliveryReport": True}
        await dev.publish("devices/sensor-1/up", json.dumps(envelope), qos=1)
        await sim.wait_for(lambda: len(sim.uplinks) == 1, timeout=10)
        up = sim.uplinks[0].message
        assert (up.ori_addr.addr_type, up.ori_addr.addr) == ("UE", SENSOR)
        assert (up.dest_addr.addr_type, up.dest_addr.addr) == ("AS", DEMO_AS)
        assert (up.msg_id, up.payload, up.deliv_st_req_ind) == ("up-1", "t=21.5", True)
        # The server's report (it plays the AS) comes back on the device's report topic.
        report = await next_json(dev, "devices/sensor-1/report")
        assert report == {"msgId": "up-1", "delivered": True}

        # Downlink with delivStReqInd: the device's PUBACK becomes the success report.
        push = await sim.send_downlink(
            SENSOR, "set-interval=60", deliv_st_req_ind=True, msg_id="d-1"
        )
        assert push.status == 204
        got = await next_json(dev, "devices/sensor-1/down")
        assert (got["msgId"], got["payload"]) == ("d-1", "set-interval=60")
        assert got["origin"] == {"addrType": "AS", "addr": sim.settings.as_address}
        await sim.wait_for(lambda: len(sim.reports) == 1, timeout=10)
        rep = sim.reports[0].report
        assert (rep.msg_id, rep.deliv_st) == ("d-1", "REPT_DELY_SUCCESS")
        assert (rep.ori_addr.addr_type, rep.ori_addr.addr) == ("UE", SENSOR)
        assert rep.dest_addr.addr == sim.settings.as_address
    # A clean stop deregisters; no uplink was ever refused or sent twice.
    assert sim.registrations == []
    assert all(registered for *_, registered in sim.uplink_arrivals)
    assert not sim.duplicates


async def test_learned_device_is_registered_before_its_first_message(
    broker: Mosquitto, sim: RecordingSim, gateway_config: Callable[..., config.Settings]
) -> None:
    settings = gateway_config(mqtt_tables(broker))
    async with running_gateway(settings) as gw, device_client(broker, "newcomer", tls=True) as dev:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
        assert sim.registrations[0].ue_svc_ids == (SENSOR,)
        await until(lambda: gw.transports["field"].connected, timeout=10)  # type: ignore[attr-defined]

        # A device the mapping does not list, but the template admits.
        await dev.publish(
            "devices/meter-7/up", json.dumps({"msgId": "m-1", "payload": "kWh=3"}), qos=1
        )
        await sim.wait_for(lambda: len(sim.uplinks) == 1, timeout=10)
        new = "ue-meter-7@iot.example"
        assert sim.uplinks[0].message.ori_addr.addr == new
        # The registration update grew the set: same registration, one more UE.
        (reg,) = sim.registrations
        assert set(reg.ue_svc_ids) == {SENSOR, new}

        # Order: the update naming meter-7 came in before its message did.
        registered = min(t for t, ids in sim.registered_at if new in ids)
        (arrival,) = [(t, ok) for t, ori, _, ok in sim.uplink_arrivals if ori == new]
        assert registered < arrival[0]
        assert arrival[1], "the uplink reached the server before meter-7 was registered"
        assert len(sim.registered_at) >= 2  # the creation, then the update

        # The learned device is now a known one: a downlink reaches it.
        await dev.subscribe("devices/meter-7/down", qos=1)
        push = await sim.send_downlink(new, "reset", msg_id="d-m7")
        assert push.status == 204
        assert (await next_json(dev, "devices/meter-7/down"))["msgId"] == "d-m7"


async def test_two_processes_register_a_learned_device_before_its_first_message(
    broker: Mosquitto, sim: RecordingSim, gateway_config: Callable[..., config.Settings]
) -> None:
    """gateway.processes = 2, a real ``gatewayd run``: the devices part learns meter-7 from
    its first message; the northbound part, which registers, learns it through the store
    and has the server's registration name it before the message goes out. A downlink to
    it then crosses back: the northbound part takes it, the devices part delivers it."""
    settings = gateway_config(mqtt_tables(broker), extra='[log]\nformat = "json"\n')
    source = settings.source
    text = source.read_text().replace("drain_timeout = 5.0", "drain_timeout = 5.0\nprocesses = 2")
    source.write_text(text)
    log = source.parent / "gateway.log"
    with log.open("wb") as stderr:
        owner = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gatewayd.cli", "run", "--config", str(source), stderr=stderr
        )
    try:
        async with device_client(broker, "newcomer", tls=True) as dev:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=30)
            assert sim.registrations[0].ue_svc_ids == (SENSOR,)
            await dev.subscribe("devices/meter-7/down", qos=1)
            new = "ue-meter-7@iot.example"
            # Until the devices part has subscribed, the broker drops what is published:
            # the same msgId again until it arrives (the gateway keeps one).
            envelope = json.dumps({"msgId": "m-1", "payload": "kWh=3"})
            while not sim.uplinks:
                await dev.publish("devices/meter-7/up", envelope, qos=1)
                await asyncio.sleep(0.3)
            await sim.wait_for(lambda: len(sim.uplinks) >= 1, timeout=10)
            assert {u.message.ori_addr.addr for u in sim.uplinks} == {new}
            (reg,) = sim.registrations
            assert set(reg.ue_svc_ids) == {SENSOR, new}
            assert all(registered for *_, registered in sim.uplink_arrivals)

            push = await sim.send_downlink(new, "reset", msg_id="d-m7")
            assert push.status == 204
            assert (await next_json(dev, "devices/meter-7/down"))["msgId"] == "d-m7"
        owner.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(owner.wait(), 30) == 0, log.read_text()[-3000:]
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()
    learned = [
        json.loads(line) for line in log.read_text().splitlines() if '"device.learned"' in line
    ]
    assert {e["part"] for e in learned} == {"devices", "northbound"}  # learnt, then synced


async def _uplink_burst(
    broker: Mosquitto,
    sim: RecordingSim,
    gateway_config: Callable[..., config.Settings],
    count: int,
) -> float:
    """Publish ``count`` QoS 1 uplinks from 20 learned devices; return the elapsed time."""
    settings = gateway_config(mqtt_tables(broker, static=False))
    sent = [f"b-{i}" for i in range(count)]
    items = [
        (f"devices/sensor-{i % 20}/up", json.dumps({"msgId": m, "payload": m}).encode())
        for i, m in enumerate(sent)
    ]
    async with running_gateway(settings) as gw, device_client(broker, "burster", tls=True) as dev:
        await until(lambda: gw.transports["field"].connected, timeout=10)  # type: ignore[attr-defined]
        start = time.monotonic()
        await publish_all(dev, items, qos=1)
        await sim.wait_for(lambda: len(sim.uplinks) >= count, timeout=60 + count / 50)
        elapsed = time.monotonic() - start
    got = [u.message.msg_id for u in sim.uplinks]
    assert sorted(got) == sorted(sent)  # complete, and each once
    assert all(u.message.payload == u.message.msg_id for u in sim.uplinks)
    assert all(registered for *_, registered in sim.uplink_arrivals)
    return elapsed


async def test_uplink_burst_arrives_complete(
    broker: Mosquitto, sim: RecordingSim, gateway_config: Callable[..., config.Settings]
) -> None:
    await _uplink_burst(broker, sim, gateway_config, CI_BURST)


@pytest.mark.slow
async def test_uplink_burst_10k_arrives_complete(
    broker: Mosquitto, sim: RecordingSim, gateway_config: Callable[..., config.Settings]
) -> None:
    elapsed = await _uplink_burst(broker, sim, gateway_config, LONG_BURST)
    assert elapsed < 600


async def test_broker_restart_with_gateway_running_loses_nothing(
    broker: Mosquitto, sim: RecordingSim, gateway_config: Callable[..., config.Settings]
) -> None:
    n = 600
    ids = [f"r-{i}" for i in range(n)]
    progress = [0]
    settings = gateway_config(mqtt_tables(broker, static=False))
    async with running_gateway(settings) as gw:
        transport = gw.transports["field"]
        await until(lambda: transport.connected, timeout=10)  # type: ignore[attr-defined]
        publisher = asyncio.create_task(
            publish_stubbornly(broker, ids, progress, devices=5), name="device"
        )
        await until(lambda: progress[0] >= n // 2)
        await asyncio.to_thread(broker.restart)
        await asyncio.wait_for(publisher, 60)
        await sim.wait_for(lambda: len(sim.uplinks) >= n, timeout=60)
        assert transport.stats.connects >= 2  # type: ignore[attr-defined]
    assert sorted(u.message.msg_id for u in sim.uplinks) == sorted(ids)


async def test_gateway_restart_resumes_the_session(
    broker: Mosquitto, sim: RecordingSim, gateway_config: Callable[..., config.Settings]
) -> None:
    """Stop the gateway, publish while it is down, start it again: nothing is lost."""
    n = 600
    ids = [f"g-{i}" for i in range(n)]
    progress = [0]
    settings = gateway_config(mqtt_tables(broker, static=False))
    async with running_gateway(settings) as gw:
        await until(lambda: gw.transports["field"].connected, timeout=10)  # type: ignore[attr-defined]
        publisher = asyncio.create_task(
            publish_stubbornly(broker, ids, progress, devices=5), name="device"
        )
        await sim.wait_for(lambda: len(sim.uplinks) >= n // 4, timeout=30)
    # The gateway is down (and deregistered); the broker queues for its session.
    assert sim.registrations == []
    await asyncio.wait_for(publisher, 60)
    before = len(sim.uplinks)
    assert before < n
    async with running_gateway(settings):
        # Learned devices come back from the store: registered before anything is sent.
        await sim.wait_for(lambda: len(sim.uplinks) >= n, timeout=60)
        (reg,) = sim.registrations
        assert {f"ue-sensor-{i}@iot.example" for i in range(5)} <= set(reg.ue_svc_ids)
    assert sorted(u.message.msg_id for u in sim.uplinks) == sorted(ids)
    assert all(registered for *_, registered in sim.uplink_arrivals)
