"""Entry point of the gatewayd-smpp plugin: registers its classes with gatewayd."""

from __future__ import annotations

from gatewayd.api import Registry, TransportFactory, hookimpl
from gatewayd_smpp.transport import SmppTransport

GATEWAYD_API_VERSION = "1.0"


@hookimpl
def gatewayd_register_transports(registry: Registry[TransportFactory]) -> None:
    """Offer the ``smpp`` transport: SMS devices behind an SMSC (SMPP 3.4, L3G role)."""
    registry.add("smpp", SmppTransport)
