"""Bursts in both directions arrive complete (1,000 messages; 10,000 in long mode: --long)."""

from __future__ import annotations

import asyncio
import json

import pytest
from gatewayd_testing import MemoryTransportContext
from mosquitto import Mosquitto
from mqtt_helpers import (
    BURST,
    LONG_BURST,
    device_client,
    make_transport,
    publish_all,
    running,
)

from gatewayd.api import Address, Device, Downlink

SIZES = [BURST, pytest.param(LONG_BURST, marks=pytest.mark.slow)]


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("qos", [1, 2])
async def test_uplink_burst_arrives_complete(
    broker: Mosquitto, context: MemoryTransportContext, qos: int, count: int
) -> None:
    transport = make_transport(broker, context, uplink_qos=qos)
    sent = [f"up-{qos}-{i}" for i in range(count)]
    items = [
        (f"devices/sensor-{i % 50}/up", json.dumps({"msgId": m, "payload": m}).encode())
        for i, m in enumerate(sent)
    ]
    async with running(transport), device_client(broker) as dev:
        await publish_all(dev, items, qos=qos)
        await context.wait_for(count, timeout=60 + count / 100)
    assert sorted(context.by_msg_id) == sorted(sent)
    assert context.duplicates == 0
    assert all(context.by_msg_id[m].payload == m for m in sent)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("qos", [1, 2])
async def test_downlink_burst_arrives_complete(
    broker: Mosquitto, context: MemoryTransportContext, qos: int, count: int
) -> None:
    transport = make_transport(broker, context, downlink_qos=qos)
    received: list[str] = []
    done = asyncio.Event()
    async with running(transport), device_client(broker, "device-sink") as dev:
        await dev.subscribe("devices/+/down", qos=qos)

        async def sink() -> None:
            async for message in dev.messages:
                assert isinstance(message.payload, bytes)
                received.append(json.loads(message.payload)["msgId"])
                if len(received) == count:
                    done.set()

        reader = asyncio.create_task(sink(), name="device-sink")
        origin = Address("AS", "as-1")
        messages = [
            Downlink(
                msg_id=f"down-{qos}-{i}",
                device=Device(name=f"sensor-{i % 50}", service_id="x"),
                origin=origin,
                payload=f"cmd {i}",
            )
            for i in range(count)
        ]
        outcomes = await asyncio.gather(*(transport.deliver(m) for m in messages))
        await asyncio.wait_for(done.wait(), 60 + count / 100)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert all(o.delivered for o in outcomes)
    assert sorted(received) == sorted(m.msg_id for m in messages)
    assert transport.stats.max_inflight_seen <= 100  # the default max_inflight
