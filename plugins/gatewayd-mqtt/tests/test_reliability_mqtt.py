"""One bad device never stops the others (issue 9), over MQTT with the real gateway.

Every leg is real: mosquitto, the gateway with its store, registrar and senders, and the
reference MSGin5G Server. Each test is the regression test of one defect.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import MemoryTransportContext, refusal_line, running_gateway, until
from mosquitto import Mosquitto
from mqtt_helpers import device_client, make_transport, publish_all, running

from gatewayd import config, metrics
from gatewayd.api import Acceptance, Uplink
from gatewayd.store import Queue

TEMPLATE = "ue-{device}@iot.example"


@pytest_asyncio.fixture
async def sim(loopback_pki: Pki) -> AsyncIterator[SimServer]:
    """The server allows sensors and meters only: any other learned name is refused."""
    settings = harness.sim_settings(loopback_pki, service_ids=("ue-sensor-*", "ue-meter-*"))
    async with SimServer(settings, schema_check=True) as server:
        yield server


def plain_mqtt(broker: Mosquitto, *, protocol: str = "5", extra: str = "") -> str:
    return f"""
[transports.field]
plugin = "mqtt"
host = "127.0.0.1"
port = {broker.port}
protocol = "{protocol}"
client_id = "gw-reliability"
service_id_template = "{TEMPLATE}"
connect_timeout = 3.0
reconnect_initial = 0.05
reconnect_max = 0.5
{extra}
[[transports.field.devices]]
device = "sensor-1"
service_id = "ue-sensor-1@iot.example"
"""


def uplink_ids(sim: SimServer) -> list[str]:
    return [u.message.msg_id for u in sim.uplinks]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_lone_surrogate_is_refused_for_good_and_never_blocks_others(
    tmp_path_factory: pytest.TempPathFactory,
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
    protocol: str,
) -> None:
    """Defect 1: the poison used to be retried forever without a PUBACK; the acks behind
    it waited, the broker's window (20 here) filled, and uplink from every device
    stopped, across restarts. Now it is refused with 0x99 (MQTT 5) or acked and recorded
    (3.1.1), kept in the DLQ with its reason, logged and counted."""
    broker = Mosquitto(tmp_path_factory.mktemp("broker"), debug=True)
    broker.start()
    try:
        settings = gateway_config(plain_mqtt(broker, protocol=protocol))
        before = metrics.value(
            "gatewayd_intake_rejected_total", transport="field", reason="invalid_message"
        )
        poison = [
            ("devices/sensor-1/up", json.dumps({"payload": "\ud800"}).encode()),
            ("devices/sensor-2/up", json.dumps({"msgId": "x\udfff", "payload": "p"}).encode()),
        ]
        normal = [
            (f"devices/sensor-{3 + i % 5}/up", json.dumps({"msgId": f"n-{i}", "payload": "v"}))
            for i in range(40)
        ]
        with structlog.testing.capture_logs() as logs:
            async with running_gateway(settings) as gw, device_client(broker, "dev") as dev:
                await until(lambda: gw.transports["field"].connected, timeout=10)  # type: ignore[attr-defined]
                await publish_all(dev, poison, qos=1)
                await publish_all(dev, [(t, p.encode()) for t, p in normal], qos=1)
                await sim.wait_for(lambda: len(sim.uplinks) == 40, timeout=30)
                rejected = await gw.store.list_items(queue=Queue.INTAKE, state="dead", limit=10)
        assert sorted(uplink_ids(sim)) == sorted(f"n-{i}" for i in range(40))
        assert len(rejected) == 2
        assert all(r.last_error and r.last_error.startswith("invalid_message") for r in rejected)
        assert {r.body["device"] for r in rejected} == {"sensor-1", "sensor-2"}
        assert (
            "\\ud800" in next(r for r in rejected if r.body["device"] == "sensor-1").body["content"]
        )
        events = [e for e in logs if e["event"] == "intake.rejected"]
        assert len(events) == 2
        after = metrics.value(
            "gatewayd_intake_rejected_total", transport="field", reason="invalid_message"
        )
        assert after - before == 2
        if protocol == "5":
            # The broker saw our PUBACKs: two refusals with 0x99 (153), the rest success.
            codes = re.findall(
                r"Received PUBACK from gw-reliability \(Mid: \d+, RC:(\d+)\)", broker.log_text()
            )
            assert codes.count("153") == 2

        # A restart on the same session: the broker has nothing left to hand back.
        with structlog.testing.capture_logs() as logs:
            async with running_gateway(settings) as gw, device_client(broker, "dev") as dev:
                await until(lambda: gw.transports["field"].connected, timeout=10)  # type: ignore[attr-defined]
                await dev.publish(
                    "devices/sensor-1/up", json.dumps({"msgId": "after", "payload": "v"}), qos=1
                )
                await sim.wait_for(lambda: "after" in uplink_ids(sim), timeout=15)
        assert not [e for e in logs if e["event"] == "intake.rejected"]
    finally:
        broker.stop()


async def test_one_refusal_is_one_log_line(
    broker: Mosquitto, sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    """Monitoring counts log lines: a payload that did not parse was logged three times
    (``mqtt.payload.invalid``, the core's ``intake.rejected``, ``mqtt.uplink.rejected``),
    a message the core refused twice. The core's line is now the only one, with the
    transport, device, reason and msg_id."""
    settings = gateway_config(plain_mqtt(broker))
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    inputs = {
        "not_json": b"{not json",  # the transport's parser refuses it
        "invalid_message": json.dumps({"msgId": "late", "payload": "p", "expiry": past}),
    }
    msg_ids = {}
    async with running_gateway(settings) as gw, device_client(broker, "dev") as dev:
        transport: Any = gw.transports["field"]
        await until(lambda: transport.connected, timeout=10)
        for n, (reason, payload) in enumerate(inputs.items(), start=1):
            with structlog.testing.capture_logs() as logs:
                await dev.publish("devices/sensor-1/up", payload, qos=1)
                # Counted once the core and the transport are done with it.
                await until(lambda n=n: transport.stats.rejected == n, timeout=10)
            line = refusal_line(logs, transport="field", device="sensor-1", reason=reason)
            msg_ids[reason] = line["msg_id"]
        kept = await gw.store.list_items(queue=Queue.INTAKE, state="dead", limit=5)
    # The line names the dead-letter record: the message's own id when it had one.
    assert msg_ids == {r.body["reason"]: r.msg_id for r in kept}
    assert msg_ids["invalid_message"] == "late"


async def test_refused_messages_keep_their_device_order(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    """Defect 3: after a storage refusal each refused message waited its own timer while
    the device's later ones were stored at once (1..5, 17..29, 6, 7, ...)."""
    context.refusals = 8
    context.retry_after = 0.2
    transport = make_transport(broker, context)
    ids = [f"o-{i}" for i in range(30)]
    other = [f"x-{i}" for i in range(30)]
    items = [
        (topic, json.dumps({"msgId": m, "payload": "v"}).encode())
        for pair in zip(ids, other, strict=True)
        for topic, m in (("devices/sensor-1/up", pair[0]), ("devices/sensor-2/up", pair[1]))
    ]
    async with running(transport), device_client(broker) as dev:
        await publish_all(dev, items, qos=1)
        await context.wait_for(60)
    order = [u.msg_id for u in context.accepted]
    assert [m for m in order if m in ids] == ids
    assert [m for m in order if m in other] == other
    assert transport.stats.refusals >= 8


async def test_uplink_qos_2_is_warned_about(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    """Defect 6: uplink_qos = 2 was accepted without a word."""
    with structlog.testing.capture_logs() as logs:
        make_transport(broker, context, uplink_qos=2)
        make_transport(broker, context, uplink_qos=1, name="other")
    warnings = [e for e in logs if e["event"] == "mqtt.config.unsafe"]
    assert [w["key"] for w in warnings] == ["transports.mqtt.uplink_qos"]


async def test_stock_broker_drops_are_reported(
    tmp_path_factory: pytest.TempPathFactory,
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
) -> None:
    """Real brokers: with mosquitto's stock max_queued_messages (1000), a burst for a
    session that is away is dropped after the devices got their PUBACKs. The gateway
    reads the broker's $SYS counter: a warning event and a metric, and together with
    what arrived they account for every message the devices sent. The drops happen
    while the gateway is away: its last reading, kept in the store, is the baseline."""
    broker = Mosquitto(tmp_path_factory.mktemp("stock"), stock=True)
    broker.start()
    try:
        settings = gateway_config(plain_mqtt(broker))
        async with running_gateway(settings) as gw:
            transport: Any = gw.transports["field"]
            await until(lambda: transport.stats.broker_readings > 0, timeout=10)
        # The persistent session exists and is away: the broker queues for it.
        sent = 1300
        items = [
            ("devices/sensor-1/up", json.dumps({"msgId": f"b-{i}", "payload": "v"}).encode())
            for i in range(sent)
        ]
        async with device_client(broker) as dev:
            await publish_all(dev, items, qos=1)  # every one PUBACKed by the broker
        before = metrics.value("gatewayd_transport_peer_dropped_total", transport="field")
        with structlog.testing.capture_logs() as logs:
            async with running_gateway(settings):

                def dropped() -> float:
                    return (
                        metrics.value("gatewayd_transport_peer_dropped_total", transport="field")
                        - before
                    )

                await until(lambda: dropped() > 0, timeout=20)
                await sim.wait_for(lambda: len(sim.uplinks) + dropped() >= sent, timeout=60)
        assert dropped() >= sent - 1000 - broker.max_inflight
        assert len(sim.uplinks) + dropped() == sent
        warnings = [e for e in logs if e["event"] == "transport.peer_dropped"]
        assert warnings
        assert warnings[0]["log_level"] == "warning"
    finally:
        broker.stop()


async def test_unlisted_device_refused_by_the_server_refuses_only_itself(
    broker: Mosquitto, sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    """Defect 2: the template admitted ``rogue-1``, the device was saved before the server
    accepted it, the server's 403 on the registration update made the gateway exit 3,
    and every restart exited 3 again. Now that device alone is refused."""
    settings = gateway_config(plain_mqtt(broker))
    with structlog.testing.capture_logs() as logs:
        async with running_gateway(settings) as gw, device_client(broker, "dev") as dev:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            await until(lambda: gw.transports["field"].connected, timeout=10)  # type: ignore[attr-defined]
            for topic, msg_id in (
                ("devices/rogue-1/up", "r-1"),
                ("devices/sensor-3/up", "s3-1"),
                ("devices/sensor-1/up", "s1-1"),
            ):
                await dev.publish(topic, json.dumps({"msgId": msg_id, "payload": "v"}), qos=1)
            await sim.wait_for(lambda: {"s3-1", "s1-1"} <= set(uplink_ids(sim)), timeout=20)
            await until(lambda: any(e["event"] == "device.refused" for e in logs), timeout=10)
            # Its later messages are refused at intake; everyone else carries on.
            for topic, msg_id in (("devices/rogue-1/up", "r-2"), ("devices/sensor-3/up", "s3-2")):
                await dev.publish(topic, json.dumps({"msgId": msg_id, "payload": "v"}), qos=1)
            await sim.wait_for(lambda: "s3-2" in uplink_ids(sim), timeout=20)
            dead_up = await gw.store.list_items(queue=Queue.UPLINK, state="dead", limit=10)
            await until(lambda: any(e["event"] == "intake.rejected" for e in logs), timeout=10)
            rejected = await gw.store.list_items(queue=Queue.INTAKE, state="dead", limit=10)
            (reg,) = sim.registrations
            served = set(reg.ue_svc_ids)
    assert "r-1" not in uplink_ids(sim)
    assert "r-2" not in uplink_ids(sim)
    assert [i.msg_id for i in dead_up] == ["r-1"]  # acked before the refusal: in the DLQ
    assert [(i.msg_id, i.body["device"]) for i in rejected] == [("r-2", "rogue-1")]
    assert served == {"ue-sensor-1@iot.example", "ue-sensor-3@iot.example"}
    (refused,) = [e for e in logs if e["event"] == "device.refused"]
    assert (refused["device"], refused["cause"]) == ("rogue-1", "SERVICE_ID_NOT_ALLOWED")
    assert not [e for e in logs if e["event"] == "registration.refused"]

    # A restart serves everyone again: the refused device was not kept.
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
        assert await gw.store.learned_devices() == [
            ("field", "sensor-3", "ue-sensor-3@iot.example")
        ]


def test_check_config_warns_about_uplink_qos_2(tmp_path: Path, loopback_pki: Pki) -> None:
    """Defect 6, as an operator sees it: ``gatewayd check-config`` says it (and passes)."""
    transport = """
[transports.field]
plugin = "mqtt"
client_id = "gw"
uplink_qos = 2
"""
    path = tmp_path / "gw.toml"
    path.write_text(
        harness.gateway_toml(
            loopback_pki,
            api_root="https://127.0.0.1:9",
            state_dir=tmp_path / "state",
            transports=transport,
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "mqtt.config.unsafe" in output
    assert "transports.field.uplink_qos" in output


class BuggyContext(MemoryTransportContext):
    """accept() fails with a bug (not a refusal) on one message, every time."""

    async def accept(self, uplink: Uplink) -> Acceptance:
        if uplink.msg_id == "bug":
            raise ValueError("a bug the core did not foresee")
        return await super().accept(uplink)


async def test_a_message_that_keeps_failing_unexpectedly_is_poison(broker: Mosquitto) -> None:
    """An unforeseen poison (accept() raises something that is no refusal) used to be
    retried forever, holding its device and, the acks being ordered, every device."""
    context = BuggyContext()
    transport = make_transport(broker, context, receive_maximum=10)
    items = [("devices/sensor-1/up", json.dumps({"msgId": "bug", "payload": "p"}).encode())]
    items += [
        (f"devices/sensor-{i % 3}/up", json.dumps({"msgId": f"ok-{i}", "payload": "p"}).encode())
        for i in range(40)
    ]
    async with running(transport), device_client(broker) as dev:
        await publish_all(dev, items, qos=1)
        await context.wait_for(40, timeout=30)
        await until(lambda: bool(context.rejected), timeout=10)
    assert context.rejected == [("sensor-1", "internal_error", None)]
    assert "bug" not in context.by_msg_id
    assert transport.stats.rejected == 1
