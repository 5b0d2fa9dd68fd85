"""A throw-away deployment on loopback: PKI, reference server, gateway config.

Shared by ``gatewayd demo`` and the test kit (:mod:`gatewayd_testing`), so the demo
shows exactly what the tests check. Nothing here is for production use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd import config, pki
from gatewayd.api import TlsIdentity, TrustAnchors
from gatewayd.daemon import Gateway
from gatewayd.plugins import Plugins
from gatewayd_sim.policy import AllowList
from gatewayd_sim.settings import SimSettings, gateway

DEMO_SERVICE_ID = "ue-sensor-1@iot.example"
DEMO_AS = "as-telemetry@m5s.example"


@dataclass(frozen=True, slots=True)
class Pki:
    """The files of a throw-away PKI (see :func:`gatewayd.pki.init`)."""

    files: dict[str, Path]

    def __getitem__(self, name: str) -> Path:
        return self.files[name]

    def identity(self, stem: str) -> TlsIdentity:
        return TlsIdentity(
            cert_chain_pem=self.files[stem].read_bytes(),
            key_pem=self.files[f"{stem}_key"].read_bytes(),
        )

    def trust(self) -> TrustAnchors:
        return TrustAnchors(ca_pem=self.files["ca"].read_bytes())


def make_pki(directory: Path) -> Pki:
    # The test kit's devices also serve HTTPS webhooks on loopback, so their certificate
    # asks for a server identity ("localhost"); `gatewayd pki init` leaves that out.
    return Pki(pki.init(directory, device_names=("localhost",)))


def sim_settings(
    tls: Pki,
    *,
    gateway_id: str = pki.DEMO_GATEWAY_ID,
    gateway_type: str = "N3G",
    service_ids: tuple[str, ...] = ("ue-*",),
    **overrides: Any,
) -> SimSettings:
    """The reference server, allowing one gateway to serve ``service_ids``; it serves
    with ``server`` and calls gateways with ``server_client``, as deployed."""
    return SimSettings(
        identity=tls.identity("server"),
        client_identity=tls.identity("server_client"),
        trust=tls.trust(),
        allow=AllowList((gateway(gateway_id, gateway_type, service_ids),)),
        **overrides,
    )


def gateway_toml(
    tls: Pki,
    *,
    api_root: str,
    state_dir: Path,
    transports: str,
    gateway_id: str = pki.DEMO_GATEWAY_ID,
    gateway_type: str = "N3G",
    extra: str = "",
) -> str:
    """A complete gateway config on loopback; ``transports`` holds its transport tables."""
    return f"""
[gateway]
id = "{gateway_id}"
type = "{gateway_type}"
state_dir = "{state_dir}"
drain_timeout = 5.0

[northbound]
api_root = "{api_root}"
credentials = "northbound"
server_identity = "{pki.DEMO_SERVER_ID}"
registration_ttl = 600.0
timeout = 5.0

[api]
listen = "127.0.0.1:0"
allowed_peers = ["{pki.DEMO_SERVER_ID}"]

[retry]
initial = 0.2
maximum = 2.0

[relay.default_destination]
addrType = "AS"
addr = "{DEMO_AS}"

[credentials.northbound]
plugin = "x509"
cert = "{tls["gateway"]}"
key = "{tls["gateway_key"]}"
ca = "{tls["ca"]}"

{transports}
{extra}
"""


def http_transport_mtls(tls: Pki, webhook: str, *, device: str = "sensor-1") -> str:
    """The demo's HTTP transport: devices authenticate with client certificates, and the
    gateway presents its own certificate to their webhooks: mutual TLS both ways."""
    return f"""
[credentials.devices]
plugin = "x509"
cert = "{tls["gateway"]}"
key = "{tls["gateway_key"]}"
ca = "{tls["ca"]}"

[transports.web]
plugin = "http"
listen = "127.0.0.1:0"
tls = "devices"
device_auth = "client_cert"
webhook_identity = "devices"

[[transports.web.devices]]
device = "{device}"
service_id = "{DEMO_SERVICE_ID}"
identity = "{pki.DEMO_DEVICE_ID}"
webhook = "{webhook}"
webhook_ca = "{tls["ca"]}"
"""


def http_transport_bearer(*, env_var: str = "GATEWAYD_TEST_TOKEN", extra: str = "") -> str:
    """A plain-HTTP loopback transport with one bearer-token device and no webhook."""
    return f"""
[transports.web]
plugin = "http"
listen = "127.0.0.1:0"
[[transports.web.devices]]
device = "sensor-1"
service_id = "{DEMO_SERVICE_ID}"
token = {{ env = "{env_var}" }}
{extra}"""


def write_config(path: Path, text: str) -> config.Settings:
    path.write_text(text, encoding="utf-8")
    return config.load(path)


@contextlib.asynccontextmanager
async def running(
    settings: config.Settings, plugins: Plugins | None = None, *, timeout: float = 20.0
) -> AsyncIterator[Gateway]:
    """Run a gateway in this event loop; stop it cleanly on exit (raising what it raised).

    With ``api.listen`` on port 0 the gateway would advertise port 0, so the port is
    fixed up front: the API is bound first, the registration then names it.
    """
    gw = Gateway(settings, plugins or Plugins())
    task = asyncio.create_task(gw.run(), name="gateway")
    started = asyncio.ensure_future(gw.started.wait())
    await asyncio.wait([task, started], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up error
    if not started.done():
        started.cancel()
        task.cancel()
        raise TimeoutError("the gateway did not start in time")
    try:
        yield gw
    finally:
        gw.request_stop()
        await _settle(task)


async def _settle(task: Awaitable[None]) -> None:
    await task
