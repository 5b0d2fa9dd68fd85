"""Fixtures for gatewayd-smpp: a real SMSC (npm ``smpp``) per test, an in-memory context."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

# --import-mode=importlib puts no test folder on sys.path; the helpers live next door.
sys.path.insert(0, str(Path(__file__).parent))

from gatewayd_smpp.transport import SmppTransport
from gatewayd_testing import MemoryKV, MemoryTransportContext
from smsc_peer import Smsc
from strict_smsc import StrictSmsc

from gatewayd.api import Device, DeviceReport, Options, TransportSettings

PASSWORD = "s3cret"
DEVICE = "447700900001"
OTHER = "447700900002"


class SmsContext(MemoryTransportContext):
    """The test kit's in-memory context, bound as ``transport=sms``; SMS devices send no
    reports, so a report reaching it fails the test."""

    def __init__(self, devices: tuple[Device, ...], kv: MemoryKV | None = None) -> None:
        super().__init__(devices, transport="sms", kv=kv)

    async def accept_report(self, report: DeviceReport) -> None:
        raise AssertionError("SMS devices send no reports")


def make_settings(options: dict[str, Any], devices: list[str] | None = None) -> TransportSettings:
    """What the core passes: the plugin's own keys and the mapped devices."""
    return TransportSettings(
        name="sms",
        plugin="smpp",
        options=Options(options, "transports.sms"),
        base_dir=Path(),
        devices=tuple(
            Device(name=d, service_id=f"msisdn-{d}@sms.example")
            for d in (devices if devices is not None else [DEVICE, OTHER])
        ),
    )


def base_options(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "system_id": "gatewayd",
        "password": {"env": "SMPP_TEST_PASSWORD"},
        "source_addr": "4000",
        "enquire_link": 30.0,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
        "response_timeout": 2.0,
        **extra,
    }


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``slow`` tests (the 10^6-input fuzz run) unless long mode is on, also when
    only this folder runs (tests/conftest.py, which owns ``--long``, is not loaded then)."""
    if "slow" not in item.keywords:
        return
    if item.config.getoption("--long", default=False) or os.environ.get("GATEWAYD_LONG") == "1":
        return
    pytest.skip("long mode: run with --long or GATEWAYD_LONG=1")


@pytest.fixture(autouse=True)
def _password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMPP_TEST_PASSWORD", PASSWORD)


@pytest.fixture
async def smsc() -> AsyncIterator[Smsc]:
    """A running SMSC (npm smpp 0.5.1) on a free loopback port."""
    server = Smsc()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


Started = tuple[SmppTransport, SmsContext]
Starter = Callable[..., Coroutine[Any, Any, Started]]


@pytest.fixture
async def strict() -> AsyncIterator[StrictSmsc]:
    """A running strict SMSC (smpp.pdu3, Jasmin's codec) on a free loopback port."""
    server = StrictSmsc()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _starting(port: Callable[[], int]) -> AsyncIterator[Starter]:
    started: list[SmppTransport] = []

    async def start(
        bound: bool = True,
        kv: MemoryKV | None = None,
        devices: list[str] | None = None,
        **options: Any,
    ) -> Started:
        settings = make_settings(base_options(port(), **options), devices)
        context = SmsContext(settings.devices, kv)
        transport = SmppTransport(settings, context)
        await transport.start()
        started.append(transport)
        if bound:
            await asyncio.wait_for(transport.bound.wait(), 10)
        return transport, context

    yield start
    for transport in started:
        await transport.stop()


@pytest.fixture
async def start_transport(smsc: Smsc) -> AsyncIterator[Starter]:
    """Build and start an SmppTransport toward ``smsc``; wait for the bind; stop at teardown."""
    async for start in _starting(lambda: smsc.port):
        yield start


@pytest.fixture
async def start_strict(strict: StrictSmsc) -> AsyncIterator[Starter]:
    """The same, toward the strict SMSC."""
    async for start in _starting(lambda: strict.port):
        yield start
