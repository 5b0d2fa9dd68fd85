"""Broker restarts and transport restarts mid-stream lose nothing (persistent sessions)."""

from __future__ import annotations

import asyncio
import json

import aiomqtt
from mosquitto import Mosquitto
from mqtt_helpers import MemoryContext, device_client, make_transport, running, until

N = 1000


async def _publish_stubbornly(broker: Mosquitto, ids: list[str], progress: list[int]) -> None:
    """A device that republishes whatever was not PUBACKed, across broker restarts
    (at-least-once on its side; the msgIds let the gateway drop the repeats)."""
    i = 0
    while i < len(ids):
        try:
            async with device_client(broker, "stubborn-device", clean_start=False) as dev:
                while i < len(ids):
                    batch = ids[i : i + 20]
                    await asyncio.gather(
                        *(
                            dev.publish(
                                "devices/sensor-1/up", json.dumps({"msgId": m}), qos=1, timeout=5
                            )
                            for m in batch
                        )
                    )
                    i += len(batch)
                    progress[0] = i
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)


async def test_broker_restart_mid_stream_loses_nothing(
    broker: Mosquitto, context: MemoryContext
) -> None:
    ids = [f"r-{i}" for i in range(N)]
    progress = [0]
    context.delay = 0.001  # keep part of the stream in the broker's queue
    transport = make_transport(broker, context)
    async with running(transport):
        publisher = asyncio.create_task(_publish_stubbornly(broker, ids, progress), name="dev")
        await until(lambda: progress[0] >= N // 2)
        await asyncio.to_thread(broker.restart)
        await asyncio.wait_for(publisher, 60)
        await context.wait_for(N, timeout=60)
        assert transport.connected
    assert sorted(context.accepted) == sorted(ids)
    assert transport.stats.connects >= 2


async def test_transport_restart_resumes_its_session(
    broker: Mosquitto, context: MemoryContext
) -> None:
    ids = [f"t-{i}" for i in range(N)]
    progress = [0]
    first = make_transport(broker, context)
    async with running(first):
        publisher = asyncio.create_task(_publish_stubbornly(broker, ids, progress), name="dev")
        await until(lambda: len(context.accepted) >= N // 4)
    # The gateway is down while the device keeps publishing: the broker queues for us.
    await asyncio.wait_for(publisher, 60)
    assert len(context.accepted) < N
    second = make_transport(broker, context)
    async with running(second):
        await context.wait_for(N, timeout=60)
    assert sorted(context.accepted) == sorted(ids)
