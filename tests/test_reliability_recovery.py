"""Recovery without needless waiting: after a server restart, and at SIGTERM (issue 9).

The gateway runs in this process with the HTTP transport and bearer-token devices; the
reference server is stopped and started again on the same port, or replaced by a
listener that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway
from loadgen import LoadGen, device_url, export_tokens, http_bearer_transport

from gatewayd import config


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return export_tokens(monkeypatch, 5)


class TimedSim(SimServer):
    """The reference server, noting when each uplink request arrived (monotonic)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.arrivals: list[float] = []

    async def _uplink(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        return await super()._uplink(request)


async def test_server_restart_closes_the_breaker_at_the_first_answer(
    sim: SimServer,
    tokens: dict[str, str],
    gateway_config: Callable[..., config.Settings],
) -> None:
    """Defect 4: the first probe after the server's return got 403 GATEWAY_NOT_REGISTERED;
    the gateway re-registered at once, but the breaker stayed half-open and delivery
    idled a whole reset timeout (5 s here, up to 300 s) with a working server."""
    settings = gateway_config(http_bearer_transport(tokens))
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        port = sim.port
        await sim.stop()
        stats = await LoadGen(device_url(gw), tokens, per_device=4).run()
        assert len(stats.acked) == 20
        fresh = TimedSim(dataclasses.replace(sim.settings, port=port), schema_check=True)
        async with fresh:
            await fresh.wait_for(lambda: len(fresh.uplinks) == 20, timeout=60)
            # From the probe that learned "register first" to the last message.
            recovery = fresh.arrivals[-1] - fresh.arrivals[0]
    assert {u.message.msg_id for u in fresh.uplinks} == stats.acked
    assert recovery < 3.0, f"delivery idled {recovery:.1f} s after the server answered"


async def test_sigterm_stops_within_drain_timeout_against_a_silent_server(
    sim: SimServer,
    tokens: dict[str, str],
    loopback_pki: Pki,
    tmp_path: Path,
) -> None:
    """Known gap: with uplinks hanging at a server that accepts but never answers, the
    stop took drain_timeout and then another northbound.timeout to deregister."""
    toml = harness.gateway_toml(
        loopback_pki,
        api_root=sim.api_root,
        state_dir=tmp_path / "state",
        transports=http_bearer_transport(tokens),
    ).replace("drain_timeout = 5.0", "drain_timeout = 1.0")
    settings = harness.write_config(tmp_path / "gatewayd.toml", toml)
    assert settings.northbound.timeout == 5.0
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered: not even the TLS handshake

    silent: asyncio.Server | None = None
    try:
        async with running_gateway(settings) as gw:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
            port = sim.port
            await sim.stop()
            silent = await asyncio.start_server(hold, "127.0.0.1", port)
            stats = await LoadGen(device_url(gw), tokens, per_device=2).run()
            assert len(stats.acked) == 10
            await asyncio.sleep(0.5)  # the senders are now stuck in their requests
            assert held, "the gateway never reached the silent server"
            started = time.monotonic()
            gw.request_stop()
        stopped = time.monotonic() - started
    finally:
        for writer in held:
            writer.close()
        if silent is not None:
            silent.close()
            await silent.wait_closed()
    assert stopped < 1.0 + 2.0, f"the stop took {stopped:.1f} s with drain_timeout = 1 s"
