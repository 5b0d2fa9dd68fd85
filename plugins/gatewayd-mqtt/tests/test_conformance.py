"""The mqtt transport against the transport conformance suite (gatewayd_testing).

MQTT has no way to refuse a PUBLISH after the broker took it: backpressure is "hold"
(the gateway withholds its PUBACK, the broker keeps the message). Bad input is refused
for good: the core keeps it in the intake dead-letter queue, and the transport acks it
(reason code 0x99 over MQTT 5) so the broker does not redeliver it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import aiomqtt
import pytest
from gatewayd_testing import until
from gatewayd_testing.conformance import (
    DEVICE,
    SERVICE_ID,
    ConformanceEnv,
    DeviceReportSeen,
    DeviceSide,
    TransportConformance,
    UplinkAnswer,
)
from mosquitto import Mosquitto
from mqtt_helpers import device_client

from gatewayd.store import Queue


class MqttDevice(DeviceSide):
    backpressure: ClassVar[str] = "hold"

    def __init__(self, env: ConformanceEnv, broker: Mosquitto, client: aiomqtt.Client) -> None:
        self.env = env
        self.client = client
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.transport: Any = None
        self.config = f"""
            [transports.{env.transport}]
            plugin = "mqtt"
            host = "127.0.0.1"
            port = {broker.port}
            client_id = "gw-conformance"
            connect_timeout = 3.0
            reconnect_initial = 0.05
            reconnect_max = 0.5
            [[transports.{env.transport}.devices]]
            device = "{DEVICE}"
            service_id = "{SERVICE_ID}"
            """

    async def read(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            body = json.loads(message.payload)
            queue = self.reports if message.topic.matches("devices/+/report") else self.messages
            await queue.put(body)

    async def _connected(self, gateway: Any) -> Any:
        self.transport = gateway.transports[self.env.transport]
        await until(lambda: self.transport.connected, timeout=10)
        return self.transport

    async def send_uplink(
        self, gateway: Any, payload: str, *, msg_id: str, report: bool = False
    ) -> UplinkAnswer:
        await self._connected(gateway)
        body = json.dumps({"payload": payload, "msgId": msg_id, "deliveryReport": report})
        # QoS 1: the PUBACK is the broker's; the gateway acks the broker once stored.
        await self.client.publish(f"devices/{DEVICE}/up", body, qos=1)
        return UplinkAnswer(accepted=True, msg_id=msg_id, detail="PUBACK from the broker")

    async def next_downlink(self, timeout: float) -> str | None:
        body = await asyncio.wait_for(self.messages.get(), timeout)
        payload: str | None = body["payload"]
        return payload

    async def next_report(self, timeout: float) -> DeviceReportSeen:
        body = await asyncio.wait_for(self.reports.get(), timeout)
        return DeviceReportSeen(msg_id=body["msgId"], delivered=body["delivered"])

    async def send_malformed(self, gateway: Any) -> str:
        transport = await self._connected(gateway)
        before = transport.stats.rejected
        await self.client.publish(f"devices/{DEVICE}/up", b"{not json", qos=1)
        # Counted as rejected (kept in the DLQ), not as dropped: ``dropped`` is for what is
        # no message at all (stray topics, retained copies, bad reports). The count goes
        # up only once the record is stored and the ack's reason code chosen.
        await until(lambda: transport.stats.rejected == before + 1, timeout=10)
        kept = await gateway.store.list_items(queue=Queue.INTAKE, state="dead", limit=10)
        assert [(r.body["device"], r.body["reason"]) for r in kept] == [(DEVICE, "not_json")]
        return "refused for good: acked with 0x99, kept in the intake DLQ (reason=not_json)"

    async def endpoint_closed(self, gateway: Any) -> bool:
        return self.transport is not None and not self.transport.connected


class TestMqttConformance(TransportConformance):
    @pytest.fixture
    async def device_side(
        self, conformance_env: ConformanceEnv, tmp_path: Path
    ) -> AsyncIterator[DeviceSide]:
        broker = Mosquitto(tmp_path / "broker")
        broker.start()
        try:
            async with device_client(broker, DEVICE) as client:
                await client.subscribe(f"devices/{DEVICE}/down", qos=1)
                await client.subscribe(f"devices/{DEVICE}/report", qos=1)
                device = MqttDevice(conformance_env, broker, client)
                reader = asyncio.create_task(device.read(), name="conformance-mqtt-reader")
                try:
                    yield device
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
        finally:
            broker.stop()
