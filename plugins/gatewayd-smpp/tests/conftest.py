"""Fixtures for gatewayd-smpp: a real SMSC (npm ``smpp``) per test, an in-memory context."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

# --import-mode=importlib puts no test folder on sys.path; the helpers live next door.
sys.path.insert(0, str(Path(__file__).parent))

from gatewayd_smpp.transport import SmppTransport
from gatewayd_testing import MemoryTransportContext
from smsc_peer import Smsc

from gatewayd.api import Device, DeviceReport, Options, TransportSettings

PASSWORD = "s3cret"
DEVICE = "447700900001"
OTHER = "447700900002"


class SmsContext(MemoryTransportContext):
    """The test kit's in-memory context, bound as ``transport=sms``; SMS devices send no
    reports, so a report reaching it fails the test."""

    def __init__(self, devices: tuple[Device, ...]) -> None:
        super().__init__(devices, transport="sms")

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
async def start_transport(smsc: Smsc) -> AsyncIterator[Starter]:
    """Build and start an SmppTransport toward ``smsc``; wait for the bind; stop at teardown."""
    started: list[SmppTransport] = []

    async def start(bound: bool = True, **options: Any) -> Started:
        settings = make_settings(base_options(smsc.port, **options))
        context = SmsContext(settings.devices)
        transport = SmppTransport(settings, context)
        await transport.start()
        started.append(transport)
        if bound:
            await asyncio.wait_for(transport.bound.wait(), 10)
        return transport, context

    yield start
    for transport in started:
        await transport.stop()
