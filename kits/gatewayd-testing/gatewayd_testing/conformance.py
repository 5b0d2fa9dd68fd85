"""The transport conformance suite: what every transport must do, run against itself.

A transport's tests subclass :class:`TransportConformance` and provide one fixture,
``device_side``, yielding a :class:`DeviceSide`: the transport's config table for one
device, and the few device actions the suite needs, in the transport's own protocol::

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        async def device_side(self, conformance_env):
            async with MyDevice(conformance_env) as device:
                yield device

Each test then runs a real gateway (the reference server on the other side, mutual
TLS, the store on disk) with that table and checks the contract of
:class:`gatewayd.api.Transport`:

- **uplink**: a device message reaches the server, once, acknowledged only when stored;
- **downlink**: a server message reaches the device, and the transport's evidence
  becomes the server's delivery report;
- **reports**: the server's report on an uplink reaches the device, or, when the
  protocol has no way to carry it (``DeviceSide.carries_reports = False``, SMS), the
  uplink does not ask for one, or the core logs ``report.not_carried``;
- **backpressure**: with the store full, the device is refused in its protocol's terms
  (a "try later", not a loss), and the messages already taken still arrive;
- **bad input**: a malformed message is refused precisely, logged in one line at most
  (never twice), nothing reaches the server, and the transport keeps serving;
- **clean shutdown**: stopping the gateway stops the transport (``transport.stopped``),
  leaves no task behind and closes its endpoint;
- **fault containment**: another transport that fails at start, crashes in ``run()`` or
  hangs in ``stop()`` does not take this one (or the gateway) down: the core restarts
  a failing transport with backoff and abandons a hung ``stop()`` at its deadline.
"""

from __future__ import annotations

import asyncio
import textwrap
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from gatewayd_sim.harness import Pki, gateway_toml, running, sim_settings, write_config
from gatewayd_sim.server import SimServer
from structlog.testing import capture_logs

from gatewayd import config
from gatewayd.api import (
    DeliveryOutcome,
    Downlink,
    Registry,
    Transport,
    TransportFactory,
    hookimpl,
)
from gatewayd.daemon import Gateway
from gatewayd.plugins import Plugins
from gatewayd_testing import counted_lines

__all__ = [
    "DEVICE",
    "SERVICE_ID",
    "ConformanceEnv",
    "DeviceReportSeen",
    "DeviceSide",
    "TransportConformance",
    "UplinkAnswer",
]

DEVICE = "conf-dev-1"
"""The one device every conformance config maps (its transport-local name)."""
SERVICE_ID = "ue-conformance-1@iot.example"
"""Its UE Service ID (the reference server lets the test gateway serve ``ue-*``)."""


@dataclass(frozen=True, slots=True)
class ConformanceEnv:
    """What a :class:`DeviceSide` may use: the test's PKI, a private folder, the server."""

    pki: Pki
    tmp_path: Path
    sim: SimServer
    transport: str = "conf"
    """The transport's table name: write ``[transports.conf]``."""


@dataclass(frozen=True, slots=True)
class UplinkAnswer:
    """How the transport answered a device's message, in neutral terms.

    ``accepted``: acknowledged (stored); ``retry_later``: refused for now (backpressure,
    with the protocol's own hint in ``detail``); neither: refused for good.
    """

    accepted: bool
    retry_later: bool = False
    msg_id: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DeviceReportSeen:
    """A report the device received about one of its own uplink messages."""

    msg_id: str | None
    delivered: bool


class DeviceSide(ABC):
    """The device end of one transport, as the conformance suite drives it.

    ``config`` is the TOML of ``[transports.<env.transport>]`` (plus any credentials
    tables it needs) mapping :data:`DEVICE` to :data:`SERVICE_ID`; it may be set only once
    the device side started (a webhook's URL, a broker's port). The suite reads it after
    entering the ``device_side`` fixture.
    """

    carries_reports: ClassVar[bool] = True
    """Whether the protocol can carry the server's report on an uplink to the device."""

    backpressure: ClassVar[str] = "refuse"
    """How the protocol pushes back when the store is full: ``"refuse"`` (the device is
    told to try later: HTTP 503, CoAP 5.03, SMPP ESME_RTHROTTLED) or ``"hold"`` (the
    message stays unacknowledged upstream, e.g. with an MQTT broker, and arrives once
    there is room). Either way nothing is lost."""

    config: str = ""

    @abstractmethod
    async def send_uplink(
        self, gateway: Gateway, payload: str, *, msg_id: str, report: bool = False
    ) -> UplinkAnswer:
        """Send one message as :data:`DEVICE`; return once the transport answered."""

    @abstractmethod
    async def next_downlink(self, timeout: float) -> str | None:
        """The payload of the next message the device received (``TimeoutError`` if none)."""

    async def next_report(self, timeout: float) -> DeviceReportSeen:
        """The next server report the device received (only when ``carries_reports``)."""
        raise NotImplementedError

    @abstractmethod
    async def send_malformed(self, gateway: Gateway) -> str:
        """Send something the transport must refuse as invalid; return its refusal, in
        the protocol's terms (a status code, a reason code; where the protocol has no
        way to answer, such as MQTT, the transport's log event naming the reason).

        Raise ``AssertionError`` when the transport did not refuse it precisely."""

    @abstractmethod
    async def endpoint_closed(self, gateway: Gateway) -> bool:
        """After the gateway stopped: whether the device finds the transport gone."""


# --- a stand-in transport that fails on purpose (fault containment) --------------------


class FaultyTransport(Transport):
    """Fails where ``options.fault`` says: ``start``, ``run`` or ``stop`` (hangs)."""

    def __init__(self, settings: Any, context: Any) -> None:
        super().__init__(settings, context)
        self.fault = settings.options.get_str("fault")
        settings.options.check_unknown()

    async def start(self) -> None:
        if self.fault == "start":
            raise RuntimeError("conformance: fails at start")

    async def run(self) -> None:
        if self.fault == "run":
            await asyncio.sleep(0.2)
            raise RuntimeError("conformance: crashes in run()")

    async def stop(self) -> None:
        if self.fault == "stop":
            await asyncio.Event().wait()  # hangs until cancelled

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        return DeliveryOutcome.failure("conformance: no devices", permanent=True)


class _FaultyPlugin:
    @hookimpl
    def gatewayd_register_transports(self, registry: Registry[TransportFactory]) -> None:
        registry.add("conformance-faulty", FaultyTransport)


def _faulty_table(fault: str) -> str:
    return f'\n[transports.faulty]\nplugin = "conformance-faulty"\nfault = "{fault}"\n'


# --- the suite ------------------------------------------------------------------------

RunGateway = Callable[..., AbstractAsyncContextManager[Gateway]]


class TransportConformance:
    """Subclass this in your transport's tests and provide the ``device_side`` fixture."""

    timeout: ClassVar[float] = 20.0
    """Seconds any one expected event may take (generous: CI machines are shared)."""

    gateway_type: ClassVar[str] = "N3G"
    """The gateway's role for this transport: ``"N3G"`` or ``"L3G"`` (SMS)."""

    @pytest.fixture
    async def sim(self, loopback_pki: Pki) -> AsyncIterator[SimServer]:
        """The kit's reference server, allowing a gateway of :attr:`gateway_type`."""
        settings = sim_settings(loopback_pki, gateway_type=self.gateway_type)
        async with SimServer(settings, schema_check=True) as server:
            yield server

    @pytest.fixture
    def conformance_env(self, loopback_pki: Pki, tmp_path: Path, sim: SimServer) -> ConformanceEnv:
        return ConformanceEnv(pki=loopback_pki, tmp_path=tmp_path, sim=sim)

    @pytest.fixture
    def device_side(self, conformance_env: ConformanceEnv) -> DeviceSide:
        """Override in the subclass (usually an async generator fixture)."""
        raise NotImplementedError("a conformance subclass provides the device_side fixture")

    @pytest.fixture
    def run_gateway(self, conformance_env: ConformanceEnv, device_side: DeviceSide) -> RunGateway:
        """``async with run_gateway(extra=...) as gw``: the device's table plus ``extra``."""
        env = conformance_env
        counter = iter(range(1000))

        def start(*, extra: str = "", faulty: bool = False) -> AbstractAsyncContextManager[Gateway]:
            text = gateway_toml(
                env.pki,
                api_root=env.sim.api_root,
                state_dir=env.tmp_path / "state",
                transports=textwrap.dedent(device_side.config),
                gateway_type=self.gateway_type,
                extra=extra,
            )
            settings: config.Settings = write_config(
                env.tmp_path / f"gatewayd-{next(counter)}.toml", text
            )
            extras = (_FaultyPlugin(),) if faulty else ()
            return running(settings, Plugins(extra=extras), timeout=self.timeout)

        return start

    async def _registered(self, sim: SimServer) -> None:
        await sim.wait_for(lambda: sim.route(SERVICE_ID) is not None, timeout=self.timeout)

    async def _arrived(self, sim: SimServer, payload: str) -> None:
        await sim.wait_for(
            lambda: any(u.message.payload == payload for u in sim.uplinks), timeout=self.timeout
        )

    # --- uplink -----------------------------------------------------------------------

    async def test_uplink_reaches_the_server_once(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        sim = conformance_env.sim
        async with run_gateway() as gw:
            await self._registered(sim)
            answer = await device_side.send_uplink(gw, "conformance-uplink", msg_id="c-up-1")
            assert answer.accepted, f"uplink refused: {answer.detail}"
            # The store holds it from the moment it was acknowledged.
            await self._arrived(sim, "conformance-uplink")
            again = await device_side.send_uplink(gw, "conformance-uplink", msg_id="c-up-1")
            assert again.accepted, f"a redelivery must be acknowledged: {again.detail}"
            await asyncio.sleep(0.5)
        got = [u for u in sim.uplinks if u.message.payload == "conformance-uplink"]
        assert len(got) == 1, "a redelivery with the same id must be stored once"
        assert got[0].message.ori_addr.addr == SERVICE_ID

    # --- downlink ---------------------------------------------------------------------

    async def test_downlink_reaches_the_device_and_is_reported(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        sim = conformance_env.sim
        async with run_gateway():
            await self._registered(sim)
            push = await sim.send_downlink(SERVICE_ID, "conformance-down", deliv_st_req_ind=True)
            assert push.status == 204, push.error
            assert await device_side.next_downlink(self.timeout) == "conformance-down"
            await sim.wait_for(
                lambda: any(r.report.msg_id == push.msg_id for r in sim.reports),
                timeout=self.timeout,
            )
        report = next(r for r in sim.reports if r.report.msg_id == push.msg_id)
        assert report.report.delivered, report.report

    # --- reports ----------------------------------------------------------------------

    async def test_server_report_reaches_the_device(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        """Carried to the device, or (``carries_reports = False``) declined by the
        transport and logged by the core as ``report.not_carried``: never lost silently."""
        sim = conformance_env.sim
        with capture_logs() as logs:
            async with run_gateway() as gw:
                await self._registered(sim)
                answer = await device_side.send_uplink(
                    gw, "conformance-report-me", msg_id="c-rep-1", report=True
                )
                assert answer.accepted, answer.detail
                if device_side.carries_reports:
                    seen = await device_side.next_report(self.timeout)
                    assert seen.delivered
                    assert seen.msg_id in (answer.msg_id, "c-rep-1", None)
                else:
                    await self._arrived(sim, "conformance-report-me")
                    up = next(
                        u for u in sim.uplinks if u.message.payload == "conformance-report-me"
                    )
                    # A protocol that cannot carry reports may not even ask for one (SMS
                    # MO has no such flag); if it did ask, the core must say it was dropped.
                    if up.message.deliv_st_req_ind:
                        async with asyncio.timeout(self.timeout):
                            # capture_logs offers nothing to wait on: poll its list.
                            while not any(e["event"] == "report.not_carried" for e in logs):  # noqa: ASYNC110
                                await asyncio.sleep(0.05)
        if device_side.carries_reports:
            assert not any(e["event"] == "report.not_carried" for e in logs)

    # --- backpressure -----------------------------------------------------------------

    async def test_backpressure_when_the_store_is_full(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        sim = conformance_env.sim
        async with run_gateway(extra="[store]\nmax_messages = 2\n") as gw:
            await self._registered(sim)
            sim.fail(503, retry_after=1, seconds=60)  # the server is away: the store fills
            for n in (1, 2):
                answer = await device_side.send_uplink(gw, f"conformance-bp-{n}", msg_id=f"bp{n}")
                assert answer.accepted, answer.detail
            full = await device_side.send_uplink(gw, "conformance-bp-3", msg_id="bp3")
            if device_side.backpressure == "hold":
                await asyncio.sleep(1.0)
                assert not any(u.message.payload == "conformance-bp-3" for u in sim.uplinks)
            else:
                assert not full.accepted, "a message the store has no room for must be refused"
                assert full.retry_later, f"a full store is 'try later', not a loss: {full.detail}"
            sim.faults.clear()
            for n in (1, 2):
                await self._arrived(sim, f"conformance-bp-{n}")
            if device_side.backpressure == "hold":
                await self._arrived(sim, "conformance-bp-3")  # held, not lost
        if device_side.backpressure == "refuse":
            assert not any(u.message.payload == "conformance-bp-3" for u in sim.uplinks)

    # --- bad input --------------------------------------------------------------------

    async def test_bad_input_is_refused_and_the_transport_goes_on(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        sim = conformance_env.sim
        async with run_gateway() as gw:
            await self._registered(sim)
            before = len(sim.uplinks)
            with capture_logs() as logs:
                refusal = await device_side.send_malformed(gw)
            assert refusal, "send_malformed must return the protocol's refusal"
            # Monitoring counts lines: at most one warning (the core's intake.rejected
            # when the transport records the input, else the transport's own), never the
            # same refusal twice.
            lines = counted_lines(logs)
            assert len(lines) <= 1, f"one refusal, one line; got {lines}"
            answer = await device_side.send_uplink(gw, "conformance-after-bad", msg_id="c-ok")
            assert answer.accepted, answer.detail
            await self._arrived(sim, "conformance-after-bad")
        assert len(sim.uplinks) == before + 1, "the malformed message must not reach the server"

    # --- clean shutdown ---------------------------------------------------------------

    async def test_clean_shutdown(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        sim = conformance_env.sim
        name = conformance_env.transport
        with capture_logs() as logs:
            async with run_gateway() as gw:
                await self._registered(sim)
                answer = await device_side.send_uplink(gw, "conformance-last", msg_id="c-last")
                assert answer.accepted, answer.detail
        events = [(e["event"], e.get("transport")) for e in logs]
        assert ("transport.stopped", name) in events
        assert ("gateway.stopped", None) in events
        assert not [t for t in asyncio.all_tasks() if t.get_name() == f"transport:{name}"]
        assert await device_side.endpoint_closed(gw), "the endpoint must be closed after stop"
        # Acknowledged means stored: the last message is at the server or in the store.
        if not any(u.message.payload == "conformance-last" for u in sim.uplinks):
            async with run_gateway():
                await self._arrived(sim, "conformance-last")

    # --- fault containment (expected contract; the lifecycle step makes these pass) ---

    async def _still_serving(self, gw: Gateway, device_side: DeviceSide, sim: SimServer) -> None:
        # Bounded at 10 s: a contained fault costs the healthy transport nothing.
        async with asyncio.timeout(min(self.timeout, 10.0)):
            await self._registered(sim)
            answer = await device_side.send_uplink(gw, "conformance-contained", msg_id="c-cont")
            assert answer.accepted, answer.detail
            await self._arrived(sim, "conformance-contained")

    async def test_another_transport_failing_at_start_is_contained(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        async with run_gateway(extra=_faulty_table("start"), faulty=True) as gw:
            await self._still_serving(gw, device_side, conformance_env.sim)

    async def test_another_transport_crashing_in_run_is_contained(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        async with run_gateway(extra=_faulty_table("run"), faulty=True) as gw:
            await asyncio.sleep(1.0)  # the faulty transport has crashed by now
            await self._still_serving(gw, device_side, conformance_env.sim)

    async def test_another_transport_hanging_in_stop_is_bounded(
        self, run_gateway: RunGateway, device_side: DeviceSide, conformance_env: ConformanceEnv
    ) -> None:
        # drain_timeout is 5 s in the test config; one bounded stop must fit around it.
        async with asyncio.timeout(15.0):
            async with run_gateway(extra=_faulty_table("stop"), faulty=True) as gw:
                await self._still_serving(gw, device_side, conformance_env.sim)
