"""Test doubles for gatewayd-http: a real in-memory TransportContext and a static
credential backend, plus a factory that builds and starts an HttpTransport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from gatewayd_http.transport import HttpTransport

from gatewayd import pki
from gatewayd.api import (
    Acceptance,
    ConfigError,
    CredentialBackend,
    Device,
    DeviceReport,
    Options,
    PluginSettings,
    TlsIdentity,
    TransportSettings,
    TrustAnchors,
    Uplink,
)

TOKENS = {"sensor-1": "tok-sensor-1-secret", "sensor-2": "tok-sensor-2-secret"}


class StaticCredentials(CredentialBackend):
    """A backend holding fixed material, as the x509 backend would after load()."""

    def __init__(self, identity: TlsIdentity | None, trust: TrustAnchors | None) -> None:
        super().__init__(
            PluginSettings(
                name="devices", plugin="static", options=Options({}, ""), base_dir=Path()
            ),
            None,  # type: ignore[arg-type]
        )
        self._identity = identity
        self._trust = trust

    def tls_identity(self) -> TlsIdentity | None:
        return self._identity

    def trust_anchors(self) -> TrustAnchors | None:
        return self._trust


class MemoryContext:
    """Records what the transport hands over; can hold accept() or refuse it."""

    def __init__(self, devices: tuple[Device, ...]) -> None:
        self.log = structlog.get_logger("test").bind(transport="web")
        self.devices = {d.name: d for d in devices}
        self.accepted: list[Uplink] = []
        self.reports: list[DeviceReport] = []
        self.refuse: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.duplicate = False
        self.backends: dict[str, CredentialBackend] = {}

    async def accept(self, uplink: Uplink) -> Acceptance:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse is not None:
            raise self.refuse
        self.accepted.append(uplink)
        return Acceptance(
            msg_id=uplink.msg_id or f"gw-{len(self.accepted)}", duplicate=self.duplicate
        )

    async def accept_report(self, report: DeviceReport) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.reports.append(report)

    def device(self, name: str) -> Device | None:
        return self.devices.get(name)

    def credentials(self, name: str) -> CredentialBackend:
        try:
            return self.backends[name]
        except KeyError:
            raise ConfigError(f"credentials.{name}", "no such credentials") from None


def make_settings(
    options: dict[str, Any], devices: list[dict[str, Any]], base_dir: Path = Path()
) -> TransportSettings:
    """What the core passes: the plugin's own keys, and devices with their other keys."""
    mapped = tuple(
        Device(
            name=d["device"],
            service_id=d.get("service_id", f"ue-{d['device']}@iot.example"),
            options={k: v for k, v in d.items() if k not in ("device", "service_id")},
        )
        for d in devices
    )
    return TransportSettings(
        name="web",
        plugin="http",
        options=Options(options, "transports.web"),
        base_dir=base_dir,
        devices=mapped,
    )


@pytest.fixture(autouse=True)
def _tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, token in TOKENS.items():
        monkeypatch.setenv(f"TOKEN_{name.replace('-', '_').upper()}", token)


def bearer_devices(**webhooks: str) -> list[dict[str, Any]]:
    return [
        {
            "device": name,
            "token": {"env": f"TOKEN_{name.replace('-', '_').upper()}"},
            **({"webhook": webhooks[name]} if name in webhooks else {}),
        }
        for name in TOKENS
    ]


@pytest.fixture
def bearer() -> Callable[..., list[dict[str, Any]]]:
    """Builds the device tables for sensor-1 and sensor-2 with env token references."""
    return bearer_devices


Started = tuple[HttpTransport, MemoryContext]


@pytest.fixture
async def start_transport() -> AsyncIterator[Callable[..., Any]]:
    """Build, start and (at teardown) stop an HttpTransport with a MemoryContext."""
    started: list[HttpTransport] = []

    async def start(
        options: dict[str, Any],
        devices: list[dict[str, Any]],
        backends: dict[str, CredentialBackend] | None = None,
    ) -> Started:
        settings = make_settings({"listen": "127.0.0.1:0", **options}, devices)
        context = MemoryContext(settings.devices)
        context.backends.update(backends or {})
        transport = HttpTransport(settings, context)
        await transport.start()
        started.append(transport)
        return transport, context

    yield start
    for transport in started:
        await transport.stop()


class Pki:
    """A throw-away CA with a server identity for 127.0.0.1 and device certificates."""

    def __init__(self, directory: Path) -> None:
        self.ca = pki.create_ca()
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self.server = pki.issue(self.ca, "gatewayd", dns=("localhost",), ips=("127.0.0.1",))
        self.trust = TrustAnchors(ca_pem=self.ca.cert_pem)

    def identity(self, issued: pki.Issued) -> TlsIdentity:
        return TlsIdentity(cert_chain_pem=issued.cert_pem, key_pem=issued.key_pem)

    def device(self, identity: str) -> pki.Issued:
        return pki.issue(self.ca, "device", uris=(identity,), server=False)


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def device_backend(test_pki: Pki) -> CredentialBackend:
    """The ``[credentials.devices]`` backend: the listener's identity and the device CA."""
    return StaticCredentials(test_pki.identity(test_pki.server), test_pki.trust)


@pytest.fixture
def build_transport() -> Callable[..., HttpTransport]:
    """Construct (not start) an HttpTransport from the plugin's keys and device tables."""

    def build(
        options: dict[str, Any], devices: list[dict[str, Any]], base_dir: Path = Path()
    ) -> HttpTransport:
        settings = make_settings(options, devices, base_dir)
        return HttpTransport(settings, MemoryContext(settings.devices))

    return build
