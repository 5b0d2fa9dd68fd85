"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and ``/status`` over HTTP.

It is the ``[metrics]`` listener (loopback unless ``allow_remote``): one port for a
Prometheus scrape, a load balancer's or orchestrator's probes and ``gatewayd status``.
``/healthz`` answers 200 while the event loop runs; ``/readyz`` 200 only when the gateway
can do its job (see :class:`Probe`), else 503 with the reasons, one per line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from gatewayd import metrics
from gatewayd.listener import GuardedSite, ListenerLimits, runner

STATUS_CONTENT_TYPE = "application/json"


class Probe(Protocol):
    """What the listener asks the gateway."""

    def not_ready(self) -> list[str]:
        """Why the gateway is not ready; empty when it is."""

    async def status(self) -> dict[str, Any]:
        """The live state, as ``gatewayd status --json`` prints it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Where the listener ended up (port 0 in the config picks a free one)."""

    host: str
    port: int


class AdminServer:
    def __init__(self, probe: Probe) -> None:
        self._probe = probe
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, limits: ListenerLimits) -> Endpoint:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        self._runner = runner(app, limits, access_log=None)
        await self._runner.setup()
        try:
            # Idle and slow-header callers are cut like on every listener.
            await GuardedSite(self._runner, host, port, limits=limits, label="admin").start()
        except OSError:
            await self.close()
            raise
        bound = self._runner.addresses[0]
        return Endpoint(host=str(bound[0]), port=int(bound[1]))

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = await metrics.render()
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        reasons = self._probe.not_ready()
        if reasons:
            return web.Response(status=503, text="".join(f"{r}\n" for r in reasons))
        return web.Response(text="ready\n")

    async def _status(self, _request: web.Request) -> web.Response:
        body = json.dumps(await self._probe.status(), indent=2, sort_keys=True)
        return web.Response(text=body + "\n", content_type=STATUS_CONTENT_TYPE)
