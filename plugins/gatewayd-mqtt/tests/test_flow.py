"""Flow control: the broker's Receive Maximum and our own bound on uplinks in progress."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from gatewayd_testing import MemoryTransportContext, until
from mosquitto import Mosquitto
from mqtt_helpers import device_client, make_transport, publish_all, running

from gatewayd.api import Address, Device, Downlink


async def test_downlink_respects_the_brokers_receive_maximum(
    tmp_path: Path, context: MemoryTransportContext
) -> None:
    broker = Mosquitto(tmp_path / "tight", max_inflight=5)  # CONNACK Receive Maximum 5
    broker.start()
    try:
        transport = make_transport(broker, context, max_inflight=50)
        async with running(transport):
            messages = [
                Downlink(
                    msg_id=f"d{i}",
                    device=Device(name="sensor-1", service_id="s"),
                    origin=Address("AS", "as"),
                    payload="x",
                )
                for i in range(300)
            ]
            outcomes = await asyncio.gather(*(transport.deliver(m) for m in messages))
            assert transport.connected
    finally:
        broker.stop()
    assert all(o.delivered for o in outcomes)
    assert transport.stats.max_inflight_seen == 5  # reached, never exceeded
    assert transport.stats.connects == 1  # the broker never had to kick us (0x93)


async def test_uplinks_in_progress_stay_within_receive_maximum(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    context.delay = 0.005
    transport = make_transport(broker, context, receive_maximum=4)
    items = [("devices/sensor-1/up", json.dumps({"msgId": f"u{i}"}).encode()) for i in range(200)]
    async with running(transport), device_client(broker) as dev:
        await publish_all(dev, items, qos=1)
        await context.wait_for(200)
    assert len(context.by_msg_id) == 200
    assert context.max_active <= 4


@pytest.mark.parametrize("pipeline", [1, 4])
async def test_one_devices_messages_are_stored_in_turn_unless_pipelined(
    broker: Mosquitto, pipeline: int
) -> None:
    """pipeline = 1 (the default): per-device order, so the intake stores a device's
    messages one after the other. Above 1 the gateway promises no order, and the
    intake stores them concurrently, up to ``receive_maximum``."""
    context = MemoryTransportContext(pipeline=pipeline)
    context.gate = asyncio.Event()
    transport = make_transport(broker, context, receive_maximum=8)
    sent = [f"m{i}" for i in range(20)]
    items = [("devices/sensor-1/up", json.dumps({"msgId": m}).encode()) for m in sent]
    in_accept = 1 if pipeline == 1 else 8
    async with running(transport), device_client(broker) as dev:
        await publish_all(dev, items, qos=1)
        await until(lambda: transport.intake_held == 8 and context.active == in_accept)
        context.gate.set()
        await context.wait_for(20)
    assert context.max_active == in_accept
    got = [u.msg_id for u in context.accepted]
    assert got == sent or (pipeline > 1 and sorted(got) == sorted(sent))


@pytest.mark.parametrize("tls", [False, True])
async def test_intake_holds_at_most_receive_maximum_whatever_the_broker_sends(
    tmp_path: Path, context: MemoryTransportContext, tls: bool
) -> None:
    """A broker that ignores our window (MQTT 3.1.1 has none; mosquitto's
    ``max_inflight_messages 0`` sends without limit) meets a held store: the transport
    stops reading at ``receive_maximum`` messages instead of queueing all 5,000, and
    then relays every one of them, in each device's order."""
    bound, count, devices = 50, 5_000, 10
    broker = Mosquitto(tmp_path / "wide", max_inflight=0)
    broker.start()
    context.gate = asyncio.Event()  # accept() waits: nothing is stored, nothing acked
    sent = [f"h{i}" for i in range(count)]
    items = [
        (f"devices/sensor-{i % devices}/up", json.dumps({"msgId": m}).encode())
        for i, m in enumerate(sent)
    ]
    try:
        transport = make_transport(
            broker, context, protocol="3.1.1", receive_maximum=bound, tls=tls
        )
        async with running(transport), device_client(broker, tls=tls) as dev:
            await publish_all(dev, items, qos=1)  # the broker acks the device regardless
            await until(lambda: transport.intake_held >= bound)
            await asyncio.sleep(0.5)  # the broker has the other 4,950 ready to send
            assert transport.intake_held == bound
            context.gate.set()
            await context.wait_for(count, timeout=90)
            assert transport.connected
    finally:
        broker.stop()
    assert sorted(context.by_msg_id) == sorted(sent)
    assert transport.stats.max_held_seen == bound  # reached, never exceeded
    assert transport.stats.intake_pauses >= 1
    assert transport.stats.connects == 1
    for d in range(devices):  # each device's messages in the order it sent them
        got = [u.msg_id for u in context.accepted if u.device == f"sensor-{d}"]
        assert got == [m for i, m in enumerate(sent) if i % devices == d]
