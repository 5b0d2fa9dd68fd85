"""Bad payloads: a clear log event, not forwarded, acked, and the transport carries on."""

from __future__ import annotations

import json

import structlog
from gatewayd_testing import MemoryTransportContext, until
from mosquitto import Mosquitto
from mqtt_helpers import device_client, make_transport, running

from gatewayd.api import Device

LOW = ("debug", "info")


async def test_bad_payloads_are_rejected_recorded_and_acked(broker: Mosquitto) -> None:
    """Input that does not parse is handed to ``context.reject`` (the gateway keeps it in
    the DLQ), refused to the device for good, and the transport carries on. Whether a
    device is known is the core's decision (``accept`` raises UnknownDeviceError)."""
    context = MemoryTransportContext([Device(name="sensor-1", service_id="sensor-1@iot.example")])
    transport = make_transport(
        broker, context, template=None, devices=("sensor-1",), max_payload=1024
    )
    with structlog.testing.capture_logs() as logs:
        async with running(transport), device_client(broker) as dev:
            await dev.publish("devices/sensor-1/up", b"not json {", qos=1)
            await dev.publish("devices/sensor-1/up", b"[1, 2]", qos=1)
            await dev.publish("devices/sensor-1/up", json.dumps({"payload": 5}), qos=1)
            big = json.dumps({"msgId": "big", "payload": "x" * 2000})
            await dev.publish("devices/sensor-1/up", big, qos=1)
            await dev.publish("devices/sensor-1/ack", b"{}", qos=1)
            await dev.publish(
                "devices/sensor-1/up", json.dumps({"msgId": "ok", "payload": "p"}), qos=1
            )
            await context.wait_for(1)
            await until(lambda: len(context.rejected) == 4, timeout=5)
    assert list(context.by_msg_id) == ["ok"]
    reasons = [reason for _, reason, _ in context.rejected]
    assert reasons == ["not_json", "not_an_object", "bad_field", "oversize"]
    # A refusal's one line is the core's intake.rejected (this context logs none): the
    # transport says nothing more above debug. A bad report is no message, nothing the
    # core sees: its line is the transport's.
    events = [(e["event"], e.get("reason")) for e in logs if e["log_level"] not in LOW]
    assert events == [("mqtt.report.invalid", "bad_field")]
    assert transport.stats.rejected == 4
    assert transport.stats.dropped == 1  # the bad report: no message, nothing to keep


async def test_poison_is_not_redelivered_to_the_next_session(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    """The poison was acked: a restarted transport on the same session sees none of it."""
    async with running(make_transport(broker, context)), device_client(broker) as dev:
        await dev.publish("devices/sensor-1/up", b"garbage", qos=1)
        await dev.publish("devices/sensor-1/up", json.dumps({"msgId": "a"}), qos=1)
        await context.wait_for(1)
    later = MemoryTransportContext()
    async with running(make_transport(broker, later)), device_client(broker) as dev:
        await dev.publish("devices/sensor-1/up", json.dumps({"msgId": "b"}), qos=1)
        await later.wait_for(1)
    assert list(later.by_msg_id) == ["b"]
    assert later.rejected == []
