"""Entry point of the gatewayd-coap plugin: registers its transport with gatewayd."""

from __future__ import annotations

from gatewayd.api import Registry, TransportFactory, hookimpl
from gatewayd_coap.transport import CoapTransport

GATEWAYD_API_VERSION = "1.0"


@hookimpl
def gatewayd_register_transports(registry: Registry[TransportFactory]) -> None:
    """Offer the ``coap`` transport: devices POST uplinks, get downlinks as CON requests."""
    registry.add("coap", CoapTransport)
