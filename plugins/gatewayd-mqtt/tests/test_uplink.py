"""Uplink: device -> broker -> transport -> context.accept(), in both payload formats."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from gatewayd_mqtt.payloads import RAW_BASE64_PREFIX, derived_msg_id
from gatewayd_testing import MemoryTransportContext
from mosquitto import Mosquitto
from mqtt_helpers import device_client, make_transport, running

from gatewayd.api import Address


async def test_json_envelope_over_plain_tcp(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    transport = make_transport(broker, context, format="json")
    async with running(transport), device_client(broker) as dev:
        envelope = {
            "msgId": "m-1",
            "payload": "temp=21.5",
            "appId": "thermo",
            "delivStReqInd": True,
            "dest": {"addrType": "AS", "addr": "as-1@msgin5g.example"},
            "expiry": "2031-01-02T03:04:05Z",
            "future-field": 1,
        }
        await dev.publish("devices/sensor-1/up", json.dumps(envelope), qos=1)
        await context.wait_for(1)
    up = context.by_msg_id["m-1"]
    assert up.device == "sensor-1"
    assert up.payload == "temp=21.5"
    assert up.app_id == "thermo"
    assert up.report_requested is True
    assert up.dest == Address("AS", "as-1@msgin5g.example")
    assert up.expiry == datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert transport.stats.accepted == 1


async def test_raw_over_tls_with_client_certificate(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    transport = make_transport(broker, context, tls=True, format="raw", protocol="3.1.1")
    binary = bytes(range(256))
    async with running(transport), device_client(broker, tls=True, v5=False) as dev:
        assert transport.connected
        await dev.publish("devices/sensor-1/up", "héllo".encode(), qos=1)
        await dev.publish("devices/sensor-2/up", binary, qos=1)
        await dev.publish("devices/sensor-3/up", b"", qos=1)
        await context.wait_for(3)
    by_device = {u.device: u for u in context.by_msg_id.values()}
    assert by_device["sensor-1"].payload == "héllo"
    assert by_device["sensor-2"].payload is not None
    assert by_device["sensor-2"].payload.startswith(RAW_BASE64_PREFIX)
    assert by_device["sensor-3"].payload == ""
    # No msgId in a raw payload: the id is derived from topic, packet id and payload.
    for msg_id, up in context.by_msg_id.items():
        assert msg_id.startswith("mqtt-")
        assert up.msg_id == msg_id


async def test_raw_v5_user_property_gives_the_msg_id(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    transport = make_transport(broker, context, format="raw")
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("msgId", "dev-42")
    async with running(transport), device_client(broker) as dev:
        await dev.publish("devices/sensor-1/up", b"x", qos=1, properties=props)
        await dev.publish("devices/sensor-1/up", b"qos0", qos=0)
        await context.wait_for(2)
    assert context.by_msg_id["dev-42"].payload == "x"
    assert context.by_msg_id["gw-2"].payload == "qos0"  # QoS 0: the core assigns the id


async def test_device_report_goes_to_accept_report(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    transport = make_transport(broker, context)
    async with running(transport), device_client(broker) as dev:
        body = {"msgId": "down-7", "delivered": False, "cause": "display broken"}
        await dev.publish("devices/sensor-9/ack", json.dumps(body), qos=1)
        await context.wait_for(1)
    (report,) = context.reports
    assert (report.device, report.msg_id, report.delivered) == ("sensor-9", "down-7", False)
    assert report.cause == "display broken"


def test_derived_id_ignores_nothing_but_dup() -> None:
    a = derived_msg_id("devices/a/up", 7, b"p")
    assert a == derived_msg_id("devices/a/up", 7, b"p")
    assert a != derived_msg_id("devices/a/up", 8, b"p")
    assert a != derived_msg_id("devices/b/up", 7, b"p")
    assert a != derived_msg_id("devices/a/up", 7, b"q")
