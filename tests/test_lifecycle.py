"""The lifecycle owner: one task group, one stop deadline, transports contained.

Real parts: the reference server (sim), a real store, the real http transport beside
three small misbehaving transports registered in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from gatewayd_sim import harness
from gatewayd_sim.server import SimServer
from gatewayd_testing import MemoryTransportContext, until
from structlog.testing import capture_logs

from gatewayd import config
from gatewayd.api import (
    DeliveryOutcome,
    Downlink,
    ManagedTransport,
    Options,
    Registry,
    Transport,
    TransportFactory,
    TransportSettings,
    hookimpl,
)
from gatewayd.daemon import Gateway
from gatewayd.lifecycle import TRANSPORT_STOP_SECONDS, stop_budget
from gatewayd.plugins import Plugins
from gatewayd.store import SqliteStore

REPO = Path(__file__).resolve().parent.parent


BACKGROUND = {
    "registration",
    "worker:uplink",
    "worker:reports",
    "worker:downlink",
    "expiry",
    "credentials:watch",
    "credentials:expiry",
    "transport:web",
}


def _ours(names: set[str]) -> list[str]:
    return sorted(
        t.get_name() for t in asyncio.all_tasks() if not t.done() and t.get_name() in names
    )


async def test_cancelling_run_ends_every_task_before_the_store_closes(
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: a cancelled run() closed the store and deregistered while the workers,
    the registration, the sweeps and the transports' runs were still running."""
    monkeypatch.setenv("GATEWAYD_TEST_TOKEN", "t0ken-for-lifecycle")
    settings = gateway_config(harness.http_transport_bearer())
    names: set[str] = set()
    order: list[str] = []
    alive_at_close: list[str] = []
    real_close = SqliteStore.close

    async def close(store: SqliteStore) -> None:
        alive_at_close.extend(_ours(names))
        order.append("store")
        await real_close(store)

    # Before the start: the gateway keeps the bound method for its stop.
    monkeypatch.setattr(SqliteStore, "close", close)
    gw = Gateway(settings, Plugins())
    run = asyncio.create_task(gw.run(), name="gateway")
    await asyncio.wait_for(gw.started.wait(), timeout=20)
    await until(lambda: bool(sim.registrations))
    names.update(BACKGROUND)
    assert BACKGROUND - {"transport:web"} <= set(_ours(names))

    transport = gw.transports["web"]
    real_stop = transport.stop

    async def stop() -> None:
        order.append("transport")
        await real_stop()

    monkeypatch.setattr(transport, "stop", stop)

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert alive_at_close == [], f"still running when the store closed: {alive_at_close}"
    assert order == ["transport", "store"], order
    assert _ours(names) == []


def test_the_stop_budget_fits_the_units_timeout_stop_sec() -> None:
    """The worst-case stop with each example config's drain_timeout must end before
    systemd kills us (TimeoutStopSec), and docs/architecture.md states the budget."""
    unit = (REPO / "systemd" / "gatewayd.service").read_text(encoding="utf-8")
    match = re.search(r"^TimeoutStopSec=(\d+)s?$", unit, re.MULTILINE)
    assert match, "the unit sets no TimeoutStopSec"
    timeout_stop = float(match.group(1))
    examples = sorted((REPO / "conf").glob("*.toml"))
    assert examples
    for path in examples:
        text = tomllib.loads(path.read_text(encoding="utf-8"))
        drain = float(text.get("gateway", {}).get("drain_timeout", 10.0))
        assert stop_budget(drain) < timeout_stop, f"{path.name}: {stop_budget(drain)} s"
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert f"{stop_budget(10.0):g} s" in doc, "docs/architecture.md: the budget is stale"


# --- fault containment ---------------------------------------------------------------


class _Quiet(Transport):
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        return DeliveryOutcome(delivered=True)


class FailsAtStart(_Quiet):
    """Raises at its first two starts, then works."""

    starts = 0

    async def start(self) -> None:
        type(self).starts += 1
        if type(self).starts <= 2:
            raise RuntimeError("cannot start yet")


class FailsInRun(_Quiet):
    """The first instance's run() raises; the next one runs."""

    runs = 0

    async def run(self) -> None:
        type(self).runs += 1
        if type(self).runs == 1:
            raise RuntimeError("run loop broke")
        await asyncio.Event().wait()


class HangsInStop(_Quiet):
    stop_called = False

    async def stop(self) -> None:
        type(self).stop_called = True
        await asyncio.Event().wait()


class _Misbehaving:
    @hookimpl
    def gatewayd_register_transports(self, registry: Registry[TransportFactory]) -> None:
        registry.add("fails-at-start", FailsAtStart)
        registry.add("fails-in-run", FailsInRun)
        registry.add("hangs-in-stop", HangsInStop)


MISBEHAVING = """
[transports.a]
plugin = "fails-at-start"
[transports.b]
plugin = "fails-in-run"
[transports.c]
plugin = "hangs-in-stop"
"""


async def test_a_failing_or_hanging_transport_never_takes_the_gateway_down(
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: a transport raising at start failed the whole start, one raising in
    run() stopped the daemon, and a stop() that hung held the stop up for ever."""
    monkeypatch.setenv("GATEWAYD_TEST_TOKEN", "t0ken-for-lifecycle")
    monkeypatch.setattr(FailsAtStart, "starts", 0)
    monkeypatch.setattr(FailsInRun, "runs", 0)
    settings = dataclasses.replace(
        gateway_config(harness.http_transport_bearer() + MISBEHAVING), drain_timeout=0.5
    )
    logs: list[dict[str, Any]]
    with capture_logs() as logs:
        async with harness.running(settings, Plugins(extra=(_Misbehaving(),))) as gw:
            # Started although "a" failed: it comes up in the background after backoff.
            assert "web" in gw.transports
            await until(lambda: "a" in gw.transports and FailsInRun.runs >= 2)
            assert "b" in gw.transports
            assert "c" in gw.transports
            assert not gw._stop.is_set(), "a transport failure stopped the gateway"
            assert gw.supervisors["a"].restarts == 2
            assert gw.supervisors["b"].restarts == 1
            started = time.monotonic()
        took = time.monotonic() - started
    assert HangsInStop.stop_called
    assert took < stop_budget(0.5), f"the stop took {took:.1f} s"
    assert took >= TRANSPORT_STOP_SECONDS * 0.9  # it did wait for "c", then gave up
    failed = [(e["transport"], e["phase"]) for e in logs if e["event"] == "transport.failed"]
    assert failed == [("a", "start"), ("a", "start"), ("b", "run")]
    abandoned = [e["transport"] for e in logs if e["event"] == "transport.stop_abandoned"]
    assert abandoned == ["c"]
    assert not [e for e in logs if e["event"] == "task.crashed"]


# --- the context-manager form ----------------------------------------------------------


class Managed(ManagedTransport):
    """Holds one resource for its lifespan; records what happened to it."""

    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.events.append("open")
        try:
            yield
        finally:
            self.events.append("close")

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        return DeliveryOutcome(delivered=True)


def _settings(name: str) -> TransportSettings:
    return TransportSettings(
        name=name, plugin="managed", options=Options({}, f"transports.{name}"), base_dir=Path()
    )


async def test_both_transport_forms_are_async_context_managers() -> None:
    context = MemoryTransportContext()
    Managed.events = []
    async with Managed(_settings("m"), context) as managed:
        assert Managed.events == ["open"]
        assert isinstance(managed, Managed)
    assert Managed.events == ["open", "close"]
    # A start/stop transport gets the same form from the base class.
    hanging = HangsInStop(_settings("h"), context)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2), hanging:
            pass
    assert HangsInStop.stop_called


async def test_the_gateway_runs_a_managed_transport_and_closes_it_at_the_stop(
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
) -> None:
    class _Plugin:
        @hookimpl
        def gatewayd_register_transports(self, registry: Registry[TransportFactory]) -> None:
            registry.add("managed", Managed)

    Managed.events = []
    settings = gateway_config('[transports.m]\nplugin = "managed"\n')
    async with harness.running(settings, Plugins(extra=(_Plugin(),))) as gw:
        assert isinstance(gw.transports["m"], Managed)
        assert Managed.events == ["open"]
    assert Managed.events == ["open", "close"]
