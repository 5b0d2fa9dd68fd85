"""PUBACK only after accept(): a message received but not stored is never lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import structlog
from gatewayd_testing import MemoryTransportContext, until
from mosquitto import Mosquitto
from mqtt_helpers import device_client, make_transport, running

CHILD = Path(__file__).with_name("child_gateway.py")


async def _line(proc: asyncio.subprocess.Process, prefix: str) -> str:
    assert proc.stdout is not None
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert raw, "child exited early"
        line = raw.decode().strip()
        if line.startswith(prefix):
            return line


async def test_gateway_killed_before_accept_returns_loses_nothing(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        str(broker.port),
        "gw-mqtt",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await _line(proc, "READY")
        async with device_client(broker) as dev:
            await dev.publish("devices/sensor-1/up", json.dumps({"msgId": "precious"}), qos=1)
        entered = await _line(proc, "ENTERED")
        assert entered == "ENTERED precious"  # received by the gateway, not yet stored
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no DISCONNECT, no PUBACK
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Same client id, persistent session: the broker redelivers what was never acked.
    async with running(make_transport(broker, context)):
        await context.wait_for(1, timeout=20)
    assert list(context.by_msg_id) == ["precious"]


async def test_blocked_accept_is_not_acked_on_stop(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    context.gate = asyncio.Event()  # never set: the store hangs
    transport = make_transport(broker, context, drain_timeout=0.2)
    async with running(transport), device_client(broker) as dev:
        await dev.publish("devices/sensor-1/up", json.dumps({"msgId": "held"}), qos=1)
        await asyncio.wait_for(context.entered.wait(), 10)
    assert context.by_msg_id == {}
    later = MemoryTransportContext()
    async with running(make_transport(broker, later)):
        await later.wait_for(1)
    assert list(later.by_msg_id) == ["held"]


async def test_backlog_full_is_not_acked_and_delivered_later(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    context.refusals = 5  # BacklogFullError(retry_after=0.05) five times, then accepted
    transport = make_transport(broker, context)
    with structlog.testing.capture_logs() as logs:
        async with running(transport), device_client(broker) as dev:
            await dev.publish("devices/sensor-1/up", json.dumps({"msgId": "later"}), qos=1)
            await context.wait_for(1)
    assert list(context.by_msg_id) == ["later"]
    refused = [e for e in logs if e["event"] == "mqtt.uplink.refused"]
    assert len(refused) == 5
    assert all(e["msg_id"] == "later" and e["reason"] == "backlog_full" for e in refused)
    assert transport.stats.refusals == 5


async def test_backlog_full_message_stays_with_broker_across_restart(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    context.refusals = 10**9  # the store stays full
    transport = make_transport(broker, context, drain_timeout=0.3)
    async with running(transport), device_client(broker) as dev:
        await dev.publish("devices/sensor-1/up", json.dumps({"msgId": "kept"}), qos=1)
        await until(lambda: context.refused >= 2)
    assert context.by_msg_id == {}
    later = MemoryTransportContext()
    async with running(make_transport(broker, later)):
        await later.wait_for(1)
    assert list(later.by_msg_id) == ["kept"]
