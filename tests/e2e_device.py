"""A simulated HTTP device for end-to-end tests: it posts uplinks and serves a webhook."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from gatewayd_sim.harness import Pki

from gatewayd.security import tls


class Device:
    def __init__(self, pki: Pki, *, require_client_cert: bool = True) -> None:
        self.pki = pki
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.callers: list[str] = []
        self._server_ctx = tls.server_context(
            pki.identity("device"), pki.trust(), require_client_cert=require_client_cert
        )
        self.client_ctx: ssl.SSLContext = tls.client_context(pki.trust(), pki.identity("device"))
        self.webhook = ""

    async def _hook(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        peer = tls.peer_identity(request.transport.get_extra_info("ssl_object"))
        self.callers.append(peer.primary if peer else "")
        await self.inbox.put(await request.json())
        return web.Response(status=204)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Device]:
        app = web.Application()
        app.router.add_post("/inbox", self._hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._server_ctx).start()
        self.webhook = f"https://localhost:{runner.addresses[0][1]}/inbox"
        try:
            yield self
        finally:
            await runner.cleanup()

    async def send(self, port: int, device: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"https://localhost:{port}/v1/devices/{device}/messages",
                json=body,
                ssl=self.client_ctx,
            ) as resp,
        ):
            return resp.status, await resp.json(content_type=None)

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.inbox.get(), timeout)
