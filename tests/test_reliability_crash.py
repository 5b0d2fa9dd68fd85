"""Nothing accepted is lost, whole gateway: SIGKILL under load, and SIGTERM in flight.

The gateway is a real ``gatewayd run --config`` process; the reference server runs in
this test process; a load generator (``loadgen.py``) plays several bearer-token HTTP
devices that resend until they see ``202``. The promise under test: every message the
gateway answered ``202`` for reaches the server, in each device's order, whatever moment
the process dies at. Duplicates (a resend after a crash between the server's ack and the
store's ``done``) are allowed by at-least-once, and counted.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest
from aiohttp import web
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from loadgen import (
    GatewayProcess,
    LoadGen,
    check_delivery,
    device_tokens,
    percentile,
    write_gateway_config,
)


def _pending(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute("SELECT count(*) FROM items WHERE state = 'pending'").fetchone()
    return int(count)


async def _crash_cycles(
    tmp_path: Path,
    tls: Pki,
    sim: SimServer,
    *,
    cycles: int,
    devices: int,
    per_device: int,
    processes: int = 1,
) -> dict[str, int]:
    tokens = device_tokens(devices)
    config = write_gateway_config(tmp_path / "gw.toml", tls, api_root=sim.api_root, tokens=tokens)
    if processes > 1:
        text = config.read_text().replace(
            "drain_timeout = 5.0", "drain_timeout = 5.0\nprocesses = 2"
        )
        config.write_text(text)
    gw = GatewayProcess(config, tokens, tmp_path)
    killed: list[str] = []
    rng = random.Random()
    # Spread the load over the kill cycles (a restart takes a second or two).
    total = devices * per_device
    load = LoadGen(lambda: gw.url, tokens, per_device=per_device, rate=total / (cycles * 1.5))
    try:
        await gw.start()
        running = asyncio.create_task(load.run(), name="loadgen")
        for _ in range(cycles):
            # A random moment: in intake, in a commit, in a send, between ack and done.
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            if processes > 1:
                killed.append(await gw.kill_part(rng))  # the owner stops the other part
            else:
                await gw.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await gw.start()
        stats = await asyncio.wait_for(running, 300)
        assert not stats.given_up
        assert len(stats.acked) == total  # every device eventually got its 202s
        await sim.wait_for(lambda: len(sim.uplinks) >= total, timeout=120)
        figures = check_delivery(sim, load)
        code, _ = await gw.terminate()
        assert code == 0, gw.log()
    finally:
        await gw.ensure_dead()
    assert _pending(tmp_path / "state" / "gatewayd.db") == 0
    figures["kills"] = cycles
    if killed:
        figures["northbound_killed"] = killed.count("northbound")
    figures["p99_accept_ms"] = round(percentile(stats.latencies, 0.99) * 1000)
    print(f"\ncrash cycles: {figures}")
    return figures


# Two processes (gateway.processes = 2): either part is killed; its owner stops the other.
PROCESSES = pytest.mark.parametrize("processes", [1, 2], ids=["one process", "two processes"])


@PROCESSES
async def test_sigkill_under_load_loses_nothing_acknowledged(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer, processes: int
) -> None:
    figures = await _crash_cycles(
        tmp_path, loopback_pki, sim, cycles=3, devices=6, per_device=50, processes=processes
    )
    assert figures["delivered"] == 300


@pytest.mark.slow
@PROCESSES
async def test_sigkill_under_load_twenty_cycles(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer, processes: int
) -> None:
    figures = await _crash_cycles(
        tmp_path, loopback_pki, sim, cycles=20, devices=8, per_device=250, processes=processes
    )
    assert figures["delivered"] == 2000


class _StallingSim(SimServer):
    """The reference server, but uplinks hang while ``stall`` is set: requests in flight
    at SIGTERM stay in flight, as with a slow server."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stall = asyncio.Event()
        self.release = asyncio.Event()
        self.stalled = 0

    async def _uplink(self, request: web.Request) -> web.StreamResponse:
        if self.stall.is_set():
            self.stalled += 1
            await self.release.wait()
            # The gateway gave up on this request long ago; answering now must not
            # count as a delivery, or the test would prove nothing.
            raise web.HTTPServiceUnavailable
        return await super()._uplink(request)


async def test_sigterm_in_flight_exits_zero_in_bound_and_resends_after_restart(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    tokens = device_tokens(4)
    drain = 2.0
    async with _StallingSim(harness.sim_settings(loopback_pki)) as sim:
        config = write_gateway_config(
            tmp_path / "gw.toml",
            loopback_pki,
            api_root=sim.api_root,
            tokens=tokens,
            drain_timeout=drain,
            # A request timeout far beyond the drain bound: only the drain may end it.
            northbound_timeout=60.0,
        )
        gw = GatewayProcess(config, tokens, tmp_path)
        try:
            await gw.start()
            await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
            sim.stall.set()
            load = LoadGen(lambda: gw.url, tokens, per_device=10)
            stats = await load.run()
            assert len(stats.acked) == 40
            await sim.wait_for(lambda: sim.stalled >= 4, timeout=20)  # one per device lane
            code, took = await gw.terminate()
            assert code == 0, gw.log()
            # The drain bound plus teardown (deregistration and closing are quick against
            # a live server); the margin is for a loaded machine, not for the requests,
            # which would hang for 60 s.
            assert took < drain + 8.0, took
            events = [e["event"] for e in gw.events()]
            assert "gateway.stopped" in events
            assert sim.uplinks == []
            sim.stall.clear()
            sim.release.set()

            await gw.start()
            await sim.wait_for(lambda: len(sim.uplinks) == 40, timeout=60)
            assert {u.message.msg_id for u in sim.uplinks} == stats.acked
            code, _ = await gw.terminate()
            assert code == 0
        finally:
            await gw.ensure_dead()
    print(f"\nsigterm: exited 0 after {took:.2f}s with drain_timeout={drain}")
