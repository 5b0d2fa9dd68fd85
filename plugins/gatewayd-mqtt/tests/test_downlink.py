"""Downlink: deliver() and deliver_report() publish to the device's topics."""

from __future__ import annotations

import asyncio
import json

import aiomqtt
from gatewayd_mqtt.payloads import RAW_BASE64_PREFIX, decode_raw, encode_raw
from gatewayd_testing import MemoryTransportContext
from mosquitto import Mosquitto
from mqtt_helpers import device_client, make_transport, running

from gatewayd.api import Address, Device, Downlink, UplinkReport

DEVICE = Device(name="sensor-1", service_id="sensor-1@iot.example")


async def _next(dev: aiomqtt.Client) -> aiomqtt.Message:
    async for message in dev.messages:
        return message
    raise AssertionError("no message")


async def test_json_downlink_and_report(broker: Mosquitto, context: MemoryTransportContext) -> None:
    transport = make_transport(broker, context, format="json")
    async with running(transport), device_client(broker, "dev-1") as dev:
        await dev.subscribe("devices/sensor-1/#", qos=1)
        msg = Downlink(
            msg_id="d-1",
            device=DEVICE,
            origin=Address("AS", "as-1"),
            payload="open valve",
            app_id="valves",
            report_requested=True,
        )
        outcome = await transport.deliver(msg)
        got = await asyncio.wait_for(_next(dev), 5)
        assert outcome.delivered
        assert got.topic.value == "devices/sensor-1/down"
        assert isinstance(got.payload, bytes)
        assert json.loads(got.payload) == {
            "msgId": "d-1",
            "payload": "open valve",
            "appId": "valves",
            "origin": {"addrType": "AS", "addr": "as-1"},
            "delivStReqInd": True,
        }
        report = UplinkReport(device=DEVICE, msg_id="u-9", delivered=False, cause="expired")
        assert await transport.deliver_report(report)
        got = await asyncio.wait_for(_next(dev), 5)
        assert got.topic.value == "devices/sensor-1/report"
        assert isinstance(got.payload, bytes)
        assert json.loads(got.payload) == {"msgId": "u-9", "delivered": False, "cause": "expired"}


async def test_raw_downlink_decodes_the_base64_marker(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    transport = make_transport(broker, context, format="raw")
    blob = b"\x00\xffbinary"
    async with running(transport), device_client(broker, "dev-1") as dev:
        await dev.subscribe("devices/sensor-1/down", qos=1)
        msg = Downlink(
            msg_id="d-2", device=DEVICE, origin=Address("AS", "as-1"), payload=encode_raw(blob)
        )
        assert (await transport.deliver(msg)).delivered
        got = await asyncio.wait_for(_next(dev), 5)
    assert got.payload == blob
    assert got.properties is not None
    assert ("msgId", "d-2") in got.properties.UserProperty


async def test_deliver_while_broker_is_down_is_a_transient_failure(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    transport = make_transport(broker, context)
    async with running(transport):
        await asyncio.to_thread(broker.stop)
        msg = Downlink(msg_id="d-3", device=DEVICE, origin=Address("AS", "as"), payload="x")
        outcome = await asyncio.wait_for(transport.deliver(msg), 10)
        assert not outcome.delivered
        assert not outcome.permanent
        await asyncio.to_thread(broker.start)


def test_raw_rule_round_trips() -> None:
    for data in (
        b"",
        b"plain text",
        "ünïcode".encode(),
        b"\xff\xfe",
        bytes(range(256)),
        RAW_BASE64_PREFIX.encode() + b"looks encoded",
    ):
        assert decode_raw(encode_raw(data)) == data
    assert encode_raw(b"hi") == "hi"
    assert encode_raw(b"\xff") == RAW_BASE64_PREFIX + "/w=="
