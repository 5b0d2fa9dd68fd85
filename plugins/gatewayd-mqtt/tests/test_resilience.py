"""Broker restarts and transport restarts mid-stream lose nothing (persistent sessions)."""

from __future__ import annotations

import asyncio

from gatewayd_testing import MemoryTransportContext, until
from mosquitto import Mosquitto
from mqtt_helpers import make_transport, publish_stubbornly, running

N = 1000


async def test_broker_restart_mid_stream_loses_nothing(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    ids = [f"r-{i}" for i in range(N)]
    progress = [0]
    context.delay = 0.001  # keep part of the stream in the broker's queue
    transport = make_transport(broker, context)
    async with running(transport):
        publisher = asyncio.create_task(publish_stubbornly(broker, ids, progress), name="dev")
        await until(lambda: progress[0] >= N // 2)
        await asyncio.to_thread(broker.restart)
        await asyncio.wait_for(publisher, 60)
        await context.wait_for(N, timeout=60)
        assert transport.connected
    assert sorted(context.by_msg_id) == sorted(ids)
    assert transport.stats.connects >= 2


async def test_transport_restart_resumes_its_session(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    ids = [f"t-{i}" for i in range(N)]
    progress = [0]
    first = make_transport(broker, context)
    async with running(first):
        publisher = asyncio.create_task(publish_stubbornly(broker, ids, progress), name="dev")
        await until(lambda: len(context.by_msg_id) >= N // 4)
    # The gateway is down while the device keeps publishing: the broker queues for us.
    await asyncio.wait_for(publisher, 60)
    assert len(context.by_msg_id) < N
    second = make_transport(broker, context)
    async with running(second):
        await context.wait_for(N, timeout=60)
    assert sorted(context.by_msg_id) == sorted(ids)
