"""Nothing accepted is lost while the MSGin5G Server is away, and Retry-After is honoured.

The gateway runs in this process (``running_gateway``) with the HTTP transport and
bearer-token devices driven by the load generator; the reference server is stopped and
started again on the same port, or made to answer 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from gatewayd_sim.faults import Fault
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway
from loadgen import (
    LoadGen,
    device_url,
    export_tokens,
    http_bearer_transport,
)

from gatewayd import config
from gatewayd.store import Queue


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return export_tokens(monkeypatch, 5)


async def _pending(gw: object, queue: Queue = Queue.UPLINK) -> int:
    stats = await gw.store.stats()  # type: ignore[attr-defined]
    return int(stats["queues"][queue.value]["pending"])


async def _settled(gw: object, timeout: float = 20.0) -> int:
    """Pending uplinks once none is left (the server's ack comes before ``done``)."""
    deadline = time.monotonic() + timeout
    left = await _pending(gw)
    while left and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        left = await _pending(gw)
    return left


async def test_server_down_then_back_delivers_everything(
    sim: SimServer,
    tokens: dict[str, str],
    gateway_config: Callable[..., config.Settings],
) -> None:
    settings = gateway_config(http_bearer_transport(tokens))
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        arrivals = _Arrivals(sim)
        port = sim.port
        await sim.stop()  # the server is gone: connections refused

        load = LoadGen(device_url(gw), tokens, per_device=20)
        stats = await load.run()
        assert len(stats.acked) == 100  # intake does not depend on the server
        assert await _pending(gw) > 0
        assert sim.uplinks == []

        # The same server comes back on the same address (its registrations kept, as a
        # real server's would be).
        sim.settings = dataclasses.replace(sim.settings, port=port)
        await sim.start()
        # The breaker probes at 5 s, then 10 s: allow for a probe or two.
        await sim.wait_for(lambda: len(sim.uplinks) == 100, timeout=60)
        assert {u.message.msg_id for u in sim.uplinks} == stats.acked
        assert await _settled(gw) == 0
    # Once the server answers again, the backlog flows at once: no waiting out a probe
    # timeout (5 s) after the probe that found the server back.
    answered = [t for t, after in arrivals.seen if after is None]
    assert answered[-1] - answered[0] < 4.0, answered[-1] - answered[0]


class _Arrivals:
    """Wraps the sim's fault injector to note when each MSGS request arrived and whether
    it was answered 503 (``(monotonic time, retry_after or None)``)."""

    def __init__(self, sim: SimServer) -> None:
        self.seen: list[tuple[float, int | None]] = []
        self._take = sim.faults.take
        sim.faults.take = self._record  # type: ignore[method-assign]

    def _record(self) -> Fault | None:
        fault = self._take()
        self.seen.append((time.monotonic(), fault.retry_after if fault else None))
        return fault

    def too_soon(self, *, in_flight: float, tolerance: float) -> list[tuple[float, float]]:
        """Requests that arrived after a 503 (later than ``in_flight`` seconds, which
        covers requests already on the wire) but sooner than its Retry-After said."""
        bad = []
        for t_fault, after in self.seen:
            if after is None:
                continue
            for t, _ in self.seen:
                if t_fault + in_flight < t < t_fault + after - tolerance:
                    bad.append((round(t - t_fault, 3), float(after)))
        return bad


async def test_retry_after_holds_every_sender_not_only_the_refused_message(
    sim: SimServer,
    tokens: dict[str, str],
    gateway_config: Callable[..., config.Settings],
    tmp_path: Path,
) -> None:
    """Devices come one by one while the server answers 503 Retry-After: 2. After a 503,
    no uplink (of any device) may reach the server before 2 s have passed."""
    settings = gateway_config(http_bearer_transport(tokens))
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        arrivals = _Arrivals(sim)
        sim.fail(503, retry_after=2, seconds=3.0)
        # One message per device, a new device every 0.5 s: each new lane head is due
        # at once, so only a gateway-wide hold keeps it from going out during a wait.
        load = LoadGen(device_url(gw), tokens, per_device=1, start_gap=0.5)
        stats = await load.run()
        assert len(stats.acked) == 5
        await sim.wait_for(lambda: len(sim.uplinks) == 5, timeout=60)
    faulted = [t for t, after in arrivals.seen if after is not None]
    assert faulted, "the server never answered 503"
    too_soon = arrivals.too_soon(in_flight=0.4, tolerance=0.1)
    assert not too_soon, f"(seconds after a 503, its Retry-After): {too_soon}"
    assert {u.message.msg_id for u in sim.uplinks} == stats.acked


async def test_server_restart_that_forgot_the_registration_loses_nothing(
    sim: SimServer,
    tokens: dict[str, str],
    gateway_config: Callable[..., config.Settings],
) -> None:
    """A server that comes back without its registrations (no persistence) answers 403
    GATEWAY_NOT_REGISTERED until the gateway registers again: queued messages must wait
    for that, not go to the dead-letter queue."""
    settings = gateway_config(http_bearer_transport(tokens))
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        port = sim.port
        await sim.stop()
        load = LoadGen(device_url(gw), tokens, per_device=4)
        stats = await load.run()
        assert len(stats.acked) == 20
        fresh = SimServer(dataclasses.replace(sim.settings, port=port), schema_check=True)
        async with fresh:
            await fresh.wait_for(lambda: len(fresh.uplinks) == 20, timeout=60)
            assert await _settled(gw) == 0
            dead = await gw.store.list_items(queue=Queue.UPLINK, state="dead", limit=50)
    assert dead == []
    assert {u.message.msg_id for u in fresh.uplinks} == stats.acked
