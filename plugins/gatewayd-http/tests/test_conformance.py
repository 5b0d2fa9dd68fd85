"""The http transport against the transport conformance suite (gatewayd_testing)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gatewayd_testing.conformance import (
    DEVICE,
    SERVICE_ID,
    ConformanceEnv,
    DeviceReportSeen,
    DeviceSide,
    TransportConformance,
    UplinkAnswer,
)

TOKEN = "conformance-device-token"


class HttpDevice(DeviceSide):
    """A device with a bearer token, posting to the transport and serving a webhook."""

    def __init__(self, env: ConformanceEnv) -> None:
        self.env = env
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._runner: web.AppRunner | None = None
        self._session = aiohttp.ClientSession()
        self._address: tuple[str, int] | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        token = self.env.tmp_path / "device-token"
        token.write_text(TOKEN)
        token.chmod(0o600)
        self.config = f"""
            [transports.{self.env.transport}]
            plugin = "http"
            listen = "127.0.0.1:0"
            [[transports.{self.env.transport}.devices]]
            device = "{DEVICE}"
            service_id = "{SERVICE_ID}"
            token = {{ file = "{token}" }}
            webhook = "http://127.0.0.1:{port}/hook"
            """

    async def close(self) -> None:
        await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        await (self.reports if body.get("type") == "report" else self.messages).put(body)
        return web.Response(status=204)

    def _url(self, gateway: Any, path: str) -> str:
        # Remembered: after the stop, the transport no longer knows where it was bound.
        if self._address is None:
            self._address = gateway.transports[self.env.transport].address
        host, port = self._address
        return f"http://{host}:{port}/v1/devices/{DEVICE}/{path}"

    async def send_uplink(
        self, gateway: Any, payload: str, *, msg_id: str, report: bool = False
    ) -> UplinkAnswer:
        body = {"payload": payload, "msgId": msg_id, "deliveryReport": report}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self._session.post(
            self._url(gateway, "messages"), json=body, headers=headers
        ) as resp:
            answer = await resp.json(content_type=None)
            detail = f"HTTP {resp.status} {answer}"
            if resp.status == 202:
                return UplinkAnswer(accepted=True, msg_id=answer["msgId"], detail=detail)
            retry = resp.status == 503 and "Retry-After" in resp.headers
            return UplinkAnswer(accepted=False, retry_later=retry, detail=detail)

    async def next_downlink(self, timeout: float) -> str | None:
        body = await asyncio.wait_for(self.messages.get(), timeout)
        payload: str | None = body["payload"]
        return payload

    async def next_report(self, timeout: float) -> DeviceReportSeen:
        body = await asyncio.wait_for(self.reports.get(), timeout)
        return DeviceReportSeen(msg_id=body["msgId"], delivered=body["delivered"])

    async def send_malformed(self, gateway: Any) -> str:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self._session.post(
            self._url(gateway, "messages"), json={"payload": 5}, headers=headers
        ) as resp:
            assert resp.status == 400, resp.status
            assert resp.content_type == "application/problem+json"
            problem = await resp.json(content_type=None)
            return f"HTTP 400 {problem}"

    async def endpoint_closed(self, gateway: Any) -> bool:
        try:
            async with self._session.post(self._url(gateway, "messages"), json={}):
                return False
        except aiohttp.ClientConnectorError:
            return True


class TestHttpConformance(TransportConformance):
    @pytest.fixture
    async def device_side(self, conformance_env: ConformanceEnv) -> AsyncIterator[DeviceSide]:
        device = HttpDevice(conformance_env)
        await device.start()
        try:
            yield device
        finally:
            await device.close()
