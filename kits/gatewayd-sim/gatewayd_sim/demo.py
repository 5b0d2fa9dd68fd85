"""``gatewayd demo``: one device, one gateway, the reference server; mutual TLS everywhere.

Runs the same parts as production, in one process on loopback: the reference MSGin5G
Server, a gateway in the N3G role with the HTTP webhook transport, and a simulated
device that posts uplink messages with its client certificate and receives downlink
messages on its own HTTPS webhook.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gatewayd import log as logmod
from gatewayd.errors import ExitCode
from gatewayd.pki import DEMO_GATEWAY_ID
from gatewayd.security import tls
from gatewayd_sim import harness
from gatewayd_sim.server import SimServer

DEVICE = "sensor-1"


def add_parser(subparsers: Any) -> None:
    """Add ``gatewayd demo`` to the main CLI (entry point group ``gatewayd.commands``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="run a self-contained demo over mutual TLS on loopback"
    )
    parser.add_argument("--keep", type=Path, help="keep the demo's files in this folder")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    return asyncio.run(run(keep=args.keep))


class Transcript:
    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def step(self, leg: str, text: str) -> None:
        print(f"  {time.monotonic() - self._t0:6.3f}s  {leg:<30} {text}", flush=True)

    @staticmethod
    def head(text: str) -> None:
        print(f"\n{text}", flush=True)


class Webhook:
    """The device's own HTTPS endpoint; it wants the gateway's client certificate."""

    def __init__(self, pki: harness.Pki) -> None:
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.peers: list[str] = []
        self._ctx = tls.server_context(pki.identity("device"), pki.trust())
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _inbox(self, request: web.Request) -> web.Response:
        peer = tls.peer_identity(request.transport.get_extra_info("ssl_object"))  # type: ignore[union-attr]
        self.peers.append(peer.primary if peer else "")
        await self.received.put(await request.json())
        return web.Response(status=204)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Webhook]:
        app = web.Application()
        app.router.add_post("/inbox", self._inbox)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ctx)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://localhost:{port}/inbox"
        try:
            yield self
        finally:
            await self._runner.cleanup()


async def run(*, keep: Path | None = None) -> int:
    logmod.configure(os.environ.get("GATEWAYD_DEMO_LOG", "error"), "console")
    workdir = keep or Path(tempfile.mkdtemp(prefix="gatewayd-demo-"))
    try:
        return await _demo(workdir)
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


async def _demo(workdir: Path) -> int:
    out = Transcript()
    print("gatewayd demo: an N3G gateway between an HTTP device and the reference MSGin5G")
    print("server. Every leg below is a real TLS connection on loopback, mutually authenticated.")
    pki = harness.make_pki(workdir / "pki")
    async with (
        SimServer(harness.sim_settings(pki)) as sim,
        Webhook(pki).running() as webhook,
    ):
        settings = harness.write_config(
            workdir / "gatewayd.toml",
            harness.gateway_toml(
                pki,
                api_root=sim.api_root,
                state_dir=workdir / "state",
                transports=harness.http_transport_mtls(pki, webhook.url),
            ),
        )
        async with harness.running(settings) as gw:
            Transcript.head("Setup")
            out.step("pki", f"throw-away CA and certificates in {pki['ca'].parent}")
            out.step("server", f"reference MSGin5G server at {sim.api_root}")
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            reg = sim.registrations[0]
            out.step(
                "gateway -> server",
                f"registered {reg.gw_id} ({reg.gw_type}) for {', '.join(reg.ue_svc_ids)}",
            )
            _, port = gw.transports["web"].address  # type: ignore[attr-defined]

            Transcript.head("Uplink: device -> gateway -> server")
            device_ctx = tls.client_context(pki.trust(), pki.identity("device"))
            async with aiohttp.ClientSession() as device:
                async with device.post(
                    f"https://localhost:{port}/v1/devices/{DEVICE}/messages",
                    json={"payload": "temperature=21.5C", "deliveryReport": True},
                    ssl=device_ctx,
                ) as resp:
                    answer = await resp.json()
                msg_id = answer["msgId"]
                out.step("device -> gateway", f"HTTP {resp.status}, stored as msgId {msg_id}")
                await sim.wait_for(lambda: any(u.message.msg_id == msg_id for u in sim.uplinks))
                up = next(u for u in sim.uplinks if u.message.msg_id == msg_id)
                out.step(
                    "gateway -> server",
                    f"deliver-ue-message from {up.message.ori_addr} "
                    f"to {up.message.dest_addr}: acknowledged DELY_STORED",
                )
                report = await asyncio.wait_for(webhook.received.get(), 10)
                out.step(
                    "server -> gateway -> device",
                    f"delivery report for {report.get('msgId')}: "
                    f"{'delivered' if report.get('delivered') else 'failed'}",
                )

                Transcript.head("Downlink: server -> gateway -> device")
                push = await sim.send_downlink(
                    harness.DEMO_SERVICE_ID, "set-interval=60s", deliv_st_req_ind=True
                )
                out.step("server -> gateway", f"deliver-message {push.msg_id}: HTTP {push.status}")
                got = await asyncio.wait_for(webhook.received.get(), 10)
                out.step(
                    "gateway -> device",
                    f"webhook got {got.get('payload')!r} "
                    f"from {got.get('from', {}).get('addr')} "
                    f"(caller: {webhook.peers[-1]})",
                )
                await sim.wait_for(lambda: any(r.report.msg_id == push.msg_id for r in sim.reports))
                rep = next(r for r in sim.reports if r.report.msg_id == push.msg_id)
                out.step(
                    "gateway -> server", f"deliver-report for {push.msg_id}: {rep.report.deliv_st}"
                )
    Transcript.head(f"Done: gateway {DEMO_GATEWAY_ID} deregistered and stopped cleanly.")
    return int(ExitCode.OK)
