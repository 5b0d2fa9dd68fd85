"""The link state ``gatewayd status`` shows for an MQTT transport: connected /
connecting / disconnected from the session itself, reconnects and unacked publishes."""

from __future__ import annotations

import asyncio

from gatewayd_testing import MemoryTransportContext, until
from mosquitto import Mosquitto, free_port
from mqtt_helpers import make_transport, running


async def test_connected_then_not_while_the_broker_is_down_then_connected_again(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    transport = make_transport(broker, context)
    assert transport.link_state()["state"] == "disconnected"  # not started yet
    async with running(transport):
        assert transport.link_state() == {"state": "connected", "reconnects": 0, "unacked": 0}

        await asyncio.to_thread(broker.stop)
        await until(lambda: transport.link_state()["state"] != "connected", timeout=15)
        # Nothing listens: the transport waits out its backoff or is trying again.
        assert transport.link_state()["state"] in ("disconnected", "connecting")
        assert not transport.connected

        await asyncio.to_thread(broker.start)
        await until(lambda: transport.link_state()["state"] == "connected", timeout=15)
        assert transport.link_state()["reconnects"] == 1
    assert transport.link_state()["state"] == "disconnected"


async def test_a_broker_that_never_sends_connack_leaves_it_connecting(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    """A TCP peer that accepts and stays silent: the attempt is under way, not connected."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    transport = make_transport(broker, context, port=port, connect_timeout=3.0)
    start = asyncio.create_task(transport.start(), name="mqtt-start")
    try:
        await until(lambda: bool(held), timeout=10)
        assert transport.link_state() == {"state": "connecting", "reconnects": 0, "unacked": 0}
    finally:
        await transport.stop()
        await asyncio.gather(start, return_exceptions=True)
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert transport.link_state()["state"] == "disconnected"
