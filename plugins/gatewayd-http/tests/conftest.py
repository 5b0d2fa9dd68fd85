"""Fixtures for gatewayd-http: transports built on the test kit's in-memory context and
static credential backend, plus a factory that builds and starts an HttpTransport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from gatewayd_http.transport import HttpTransport
from gatewayd_testing import MemoryTransportContext, StaticCredentials

from gatewayd import pki
from gatewayd.api import (
    CredentialBackend,
    Device,
    Options,
    TlsIdentity,
    TransportSettings,
    TrustAnchors,
)

TOKENS = {"sensor-1": "tok-sensor-1-secret", "sensor-2": "tok-sensor-2-secret"}


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


Started = tuple[HttpTransport, MemoryTransportContext]


@pytest.fixture
async def start_transport() -> AsyncIterator[Callable[..., Any]]:
    """Build, start and (at teardown) stop an HttpTransport on a MemoryTransportContext."""
    started: list[HttpTransport] = []

    async def start(
        options: dict[str, Any],
        devices: list[dict[str, Any]],
        backends: dict[str, CredentialBackend] | None = None,
    ) -> Started:
        settings = make_settings({"listen": "127.0.0.1:0", **options}, devices)
        context = MemoryTransportContext(settings.devices, transport="web", backends=backends)
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
    return StaticCredentials(test_pki.identity(test_pki.server), test_pki.trust, name="devices")


@pytest.fixture
def build_transport() -> Callable[..., HttpTransport]:
    """Construct (not start) an HttpTransport from the plugin's keys and device tables."""

    def build(
        options: dict[str, Any], devices: list[dict[str, Any]], base_dir: Path = Path()
    ) -> HttpTransport:
        settings = make_settings(options, devices, base_dir)
        return HttpTransport(settings, MemoryTransportContext(settings.devices, transport="web"))

    return build
