"""Flow control: the broker's Receive Maximum and our own bound on uplinks in progress."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gatewayd_testing import MemoryTransportContext
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
