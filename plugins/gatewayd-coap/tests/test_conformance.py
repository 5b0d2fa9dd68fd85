"""The coap transport against the transport conformance suite, as a third party runs it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiocoap import error as coap_error
from coap_device import SALT, SECRET, Device, oscore_folder
from gatewayd_testing.conformance import (
    DEVICE,
    SERVICE_ID,
    ConformanceEnv,
    DeviceReportSeen,
    DeviceSide,
    TransportConformance,
    UplinkAnswer,
)


class CoapDevice(DeviceSide):
    def __init__(self, env: ConformanceEnv, device: Device, oscore: str = "") -> None:
        self.env = env
        self.device = device
        self.address: tuple[str, int] | None = None
        self.config = f"""
            [transports.{env.transport}]
            plugin = "coap"
            listen = "127.0.0.1:0"
            [[transports.{env.transport}.devices]]
            device = "{DEVICE}"
            service_id = "{SERVICE_ID}"
            endpoint = "{device.endpoint}"
            {oscore}"""

    def _address(self, gateway: Any) -> tuple[str, int]:
        if self.address is None:  # remembered for after the stop
            self.address = gateway.transports[self.env.transport].address
        return self.address

    async def send_uplink(
        self, gateway: Any, payload: str, *, msg_id: str, report: bool = False
    ) -> UplinkAnswer:
        body = json.dumps({"payload": payload, "msgId": msg_id, "deliveryReport": report})
        path = f"v1/devices/{DEVICE}/messages"
        response = await self.device.post(self._address(gateway), path, body.encode())
        detail = f"{response.code.dotted} {response.payload!r}"
        if response.code.dotted == "2.01":
            return UplinkAnswer(
                accepted=True, msg_id=json.loads(response.payload)["msgId"], detail=detail
            )
        retry = response.code.dotted == "5.03" and response.opt.max_age is not None
        return UplinkAnswer(accepted=False, retry_later=retry, detail=detail)

    async def next_downlink(self, timeout: float) -> str | None:
        body = await asyncio.wait_for(self.device.inbox.messages.get(), timeout)
        payload: str | None = body["payload"]
        return payload

    async def next_report(self, timeout: float) -> DeviceReportSeen:
        body = await asyncio.wait_for(self.device.inbox.reports.get(), timeout)
        return DeviceReportSeen(msg_id=body["msgId"], delivered=body["delivered"])

    async def send_malformed(self, gateway: Any) -> str:
        path = f"v1/devices/{DEVICE}/messages"
        response = await self.device.post(self._address(gateway), path, b'{"payload": 5}')
        assert response.code.dotted == "4.00", response.code
        return f"4.00 {response.payload.decode()}"

    async def endpoint_closed(self, gateway: Any) -> bool:
        path = f"v1/devices/{DEVICE}/messages"
        try:
            await self.device.post(self._address(gateway), path, b"{}", timeout=5.0)
        except (coap_error.NetworkError, TimeoutError):
            return True
        return False


class TestCoapConformance(TransportConformance):
    @pytest.fixture
    async def device_side(self, conformance_env: ConformanceEnv) -> AsyncIterator[DeviceSide]:
        device = Device()
        await device.start()
        try:
            yield CoapDevice(conformance_env, device)
        finally:
            await device.close()


class TestCoapOscoreConformance(TransportConformance):
    """The same contract with the device on OSCORE: a whole gateway, its store's kv."""

    @pytest.fixture
    async def device_side(
        self, conformance_env: ConformanceEnv, tmp_path: Path
    ) -> AsyncIterator[DeviceSide]:
        device = Device(oscore_folder(tmp_path / "device-oscore", device_id="01", gateway_id=""))
        (tmp_path / "oscore.key").write_text(SECRET)
        await device.start()
        table = f"""
            [transports.{conformance_env.transport}.devices.oscore]
            master_secret = {{ file = "{tmp_path / "oscore.key"}" }}
            master_salt = "{SALT}"
            sender_id = ""
            recipient_id = "01"
            """
        try:
            yield CoapDevice(conformance_env, device, table)
        finally:
            await device.close()
