"""The broker's $SYS drop counter, read from a real mosquitto: only its growth is news.

mosquitto counts every message it dropped since it started, for every client. A gateway
that took its first reading as news reported a long-running broker's whole history as
its own loss, at every start. The first reading is a baseline; the last one is kept in
``context.kv`` so a restarted gateway still reports what was dropped while it was away;
a broker restart (the counter goes down) starts a new baseline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from gatewayd_mqtt.transport import MqttTransport
from gatewayd_testing import MemoryKV, MemoryTransportContext, until
from mosquitto import Mosquitto
from mqtt_helpers import device_client, make_transport, publish_all, running
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SINK = "sink/parked"
QUEUE = 2  # the broker's max_queued_messages: a parked session overflows quickly
DROPPED = "$SYS/broker/publish/messages/dropped"
UPTIME = "$SYS/broker/uptime"  # published at every $SYS tick (sys_interval 1 here)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """Here: a broker with a short queue and a persistent session that subscribed and
    went away; the broker queues for it and drops what does not fit."""
    broker = Mosquitto(tmp_path / "broker", max_queued=QUEUE)
    broker.start()
    try:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        async with device_client(broker, "parked", clean_start=False, properties=props) as c:
            await c.subscribe(SINK, qos=1)
        yield broker
    finally:
        broker.stop()


async def overflow(broker: Mosquitto) -> None:
    """Publish more than the parked session can hold: the broker drops some (each
    publish is PUBACKed, so counted, before this returns)."""
    items = [(SINK, b"x")] * (broker.max_inflight + QUEUE + 10)
    async with device_client(broker) as client:
        await publish_all(client, items, qos=1)


async def settled(broker: Mosquitto) -> int:
    """The broker's drop counter as of now, read by a client of our own.

    The retained value may predate the last drops; two live ticks later (the counter
    goes out in the same tick as the uptime, on one connection) it cannot."""
    dropped: int | None = None
    ticks = 0
    async with device_client(broker) as client:
        await client.subscribe(DROPPED)
        await client.subscribe(UPTIME)
        async with asyncio.timeout(15):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if message.topic.matches(DROPPED):
                    dropped = int(message.payload)
                elif not message.retain:
                    ticks += 1
                    if ticks == 2 and dropped is not None:
                        return dropped
    raise AssertionError("the broker stopped publishing $SYS")


def kept(context: MemoryTransportContext) -> int:
    """The counter reading the transport keeps for its next start (its one kv row)."""
    ((value, _expires),) = context.kv.rows.values()
    return int(value)


def read(transport: MqttTransport) -> Callable[[], bool]:
    """Whether the transport has taken (and kept) a counter reading."""
    return lambda: transport.stats.broker_readings > 0


async def test_history_is_a_baseline_and_only_growth_counts(broker: Mosquitto) -> None:
    """The defect: the first reading was reported whole, the broker's history as ours."""
    await overflow(broker)  # the broker's history, before the gateway ever ran
    history = await settled(broker)
    assert history > 0
    context = MemoryTransportContext()
    transport = make_transport(broker, context)
    async with running(transport):
        await until(read(transport), timeout=15)
        assert kept(context) == history
        assert (context.peer_drops, transport.stats.broker_dropped) == (0, 0)

        await overflow(broker)  # dropped while the gateway watches: news
        grown = await settled(broker) - history
        await until(lambda: context.peer_drops == grown, timeout=15)
        assert transport.stats.broker_dropped == grown > 0


async def test_a_restarted_gateway_reports_what_was_dropped_while_away(broker: Mosquitto) -> None:
    await overflow(broker)
    history = await settled(broker)
    kv = MemoryKV()  # the gateway's store, across its restart
    first = MemoryTransportContext(kv=kv)
    transport = make_transport(broker, first)
    async with running(transport):
        await until(read(transport), timeout=15)
    assert (kept(first), first.peer_drops) == (history, 0)

    await overflow(broker)  # dropped while the gateway is away: its session overflowed
    grown = await settled(broker) - history
    again = MemoryTransportContext(kv=kv)
    transport = make_transport(broker, again)
    async with running(transport):
        await until(read(transport), timeout=15)
    assert again.peer_drops == grown > 0  # the growth, not the history


async def test_a_broker_restart_starts_a_new_baseline(broker: Mosquitto) -> None:
    context = MemoryTransportContext()
    transport = make_transport(broker, context)
    async with running(transport):
        await until(read(transport), timeout=15)
        await overflow(broker)
        before = await settled(broker)
        await until(lambda: context.peer_drops == before > 0, timeout=15)

        # Its counters start at 0 again; the parked session (persistence) is still full.
        broker.restart()
        await until(lambda: kept(context) < before, timeout=15)
        restarted = kept(context)
        assert context.peer_drops == before  # going down is no drop

        await overflow(broker)
        grown = await settled(broker) - restarted
        await until(lambda: context.peer_drops == before + grown, timeout=15)
        assert grown > 0
