"""Downlink and reports to a real aiohttp webhook server, over HTTP and HTTPS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gatewayd import pki
from gatewayd.api import Address, DeliveryOutcome, Device, Downlink, UplinkReport

SENSOR1 = Device(name="sensor-1", service_id="ue-sensor-1@iot.example")
SENSOR2 = Device(name="sensor-2", service_id="ue-sensor-2@iot.example")
ORIGIN = Address("AS", "as-1@iot.example")


class Webhook:
    """A device's inbox: records every body and answers with ``status``."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.status = 200
        self.delay = 0.0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text="ok")

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_post("/inbox", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}/inbox"


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    await hook.start()
    yield hook
    assert hook.runner is not None
    await hook.runner.cleanup()


def downlink(device: Device = SENSOR1, **kw: Any) -> Downlink:
    return Downlink(msg_id="down-1", device=device, origin=ORIGIN, payload="on", **kw)


async def test_success_posts_the_message(
    start_transport: Any, bearer: Any, webhook: Webhook
) -> None:
    transport, _ = await start_transport({}, bearer(**{"sensor-1": webhook.url}))
    outcome = await transport.deliver(downlink(app_id="app-7", report_requested=True))
    assert outcome == DeliveryOutcome.success()
    assert webhook.bodies == [
        {
            "type": "message",
            "msgId": "down-1",
            "from": {"addrType": "AS", "addr": "as-1@iot.example"},
            "payload": "on",
            "appId": "app-7",
            "deliveryReport": True,
        }
    ]


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(404, True), (400, True), (302, True), (408, False), (429, False), (503, False), (500, False)],
)
async def test_status_decides_permanence(
    start_transport: Any, bearer: Any, webhook: Webhook, status: int, permanent: bool
) -> None:
    transport, _ = await start_transport({}, bearer(**{"sensor-1": webhook.url}))
    webhook.status = status
    outcome = await transport.deliver(downlink())
    assert outcome == DeliveryOutcome.failure(f"HTTP {status}", permanent=permanent)
    assert len(webhook.bodies) == 1


async def test_connection_refused_is_transient(start_transport: Any, bearer: Any) -> None:
    # A port that was just free and has no listener: the connection is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport, _ = await start_transport(
        {}, bearer(**{"sensor-1": f"http://127.0.0.1:{port}/inbox"})
    )
    outcome = await transport.deliver(downlink())
    assert outcome.delivered is False
    assert outcome.permanent is False
    assert outcome.cause is not None


async def test_timeout_is_transient(start_transport: Any, bearer: Any, webhook: Webhook) -> None:
    transport, _ = await start_transport(
        {"delivery_timeout": 0.2}, bearer(**{"sensor-1": webhook.url})
    )
    webhook.delay = 1.0
    outcome = await transport.deliver(downlink())
    assert outcome == DeliveryOutcome.failure("timeout", permanent=False)


async def test_device_without_webhook_fails_permanently(
    start_transport: Any, bearer: Any, webhook: Webhook
) -> None:
    transport, _ = await start_transport({}, bearer(**{"sensor-1": webhook.url}))
    outcome = await transport.deliver(downlink(SENSOR2))
    assert outcome.delivered is False
    assert outcome.permanent is True
    assert webhook.bodies == []


async def test_deliver_report_posts(start_transport: Any, bearer: Any, webhook: Webhook) -> None:
    transport, _ = await start_transport({}, bearer(**{"sensor-1": webhook.url}))
    report = UplinkReport(device=SENSOR1, msg_id="up-1", delivered=False, cause="EXPIRED")
    assert await transport.deliver_report(report) is True
    assert webhook.bodies == [
        {"type": "report", "msgId": "up-1", "delivered": False, "cause": "EXPIRED"}
    ]
    webhook.status = 500
    assert await transport.deliver_report(report) is False
    assert (
        await transport.deliver_report(UplinkReport(device=SENSOR2, msg_id="u", delivered=True))
        is False
    )


async def test_https_webhook_verified_with_its_ca(
    start_transport: Any, bearer: Any, test_pki: Any, tmp_path: Path
) -> None:
    cert, key = pki.write_pair(tmp_path, "webhook", test_pki.server)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    hook = Webhook()
    await hook.start(server_ctx)
    try:
        devices = bearer(**{"sensor-1": hook.url, "sensor-2": hook.url})
        devices[0]["webhook_ca"] = str(test_pki.ca_file)  # sensor-2 uses the system trust
        transport, _ = await start_transport({}, devices)
        assert await transport.deliver(downlink()) == DeliveryOutcome.success()
        untrusted = await transport.deliver(downlink(SENSOR2))
        assert untrusted.delivered is False
        assert untrusted.permanent is False
        assert len(hook.bodies) == 1
    finally:
        assert hook.runner is not None
        await hook.runner.cleanup()


async def test_delivery_logs_bind_msg_id(
    start_transport: Any, bearer: Any, webhook: Webhook
) -> None:
    transport, _ = await start_transport({}, bearer(**{"sensor-1": webhook.url}))
    webhook.status = 404
    with capture_logs() as logs:
        await transport.deliver(downlink())
    (entry,) = [e for e in logs if e["event"] == "http.delivery.failed"]
    assert entry["msg_id"] == "down-1"
    assert entry["cause"] == "HTTP 404"
    assert entry["permanent"] is True
