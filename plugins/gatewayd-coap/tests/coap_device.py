"""A CoAP device on loopback for gatewayd-coap's tests (aiocoap only)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiocoap
from aiocoap import numbers, resource


class Inbox(resource.Resource):  # type: ignore[misc]
    """A device's own CoAP resource: records what the gateway POSTs, answers ``code``."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.code = numbers.codes.CHANGED

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        body = json.loads(request.payload)
        await (self.reports if body.get("type") == "report" else self.messages).put(body)
        return aiocoap.Message(code=self.code)


class Device:
    """A CoAP device on loopback: an ``inbox`` resource, and a client to the gateway."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.context: Any = None
        self.port = 0

    async def start(self) -> None:
        site = resource.Site()
        site.add_resource(["inbox"], self.inbox)
        self.context = await aiocoap.Context.create_server_context(
            site, bind=("127.0.0.1", 0), transports=["udp6"]
        )
        for interface in self.context.request_interfaces:
            sock = interface.token_interface.message_interface.transport.get_extra_info("socket")
            self.port = sock.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"coap://127.0.0.1:{self.port}/inbox"

    async def close(self) -> None:
        if self.context is not None:
            await self.context.shutdown()

    async def post(
        self, address: tuple[str, int], path: str, body: bytes, *, timeout: float = 10.0
    ) -> aiocoap.Message:
        host, port = address
        request = aiocoap.Message(
            code=numbers.codes.POST,
            uri=f"coap://{host}:{port}/{path}",
            payload=body,
            content_format=numbers.ContentFormat.JSON,
        )
        async with asyncio.timeout(timeout):
            return await self.context.request(request).response
