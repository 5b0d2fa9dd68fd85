"""Entry point of the gatewayd-http plugin: registers its classes with gatewayd."""

from __future__ import annotations

from gatewayd.api import Registry, TransportFactory, hookimpl
from gatewayd_http.transport import HttpTransport

GATEWAYD_API_VERSION = "1.0"


@hookimpl
def gatewayd_register_transports(registry: Registry[TransportFactory]) -> None:
    """Offer the ``http`` transport: devices POST uplinks, receive downlinks on webhooks."""
    registry.add("http", HttpTransport)
