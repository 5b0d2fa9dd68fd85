"""Entry point of the gatewayd-mqtt plugin: registers its classes with gatewayd."""

from __future__ import annotations

from gatewayd.api import Registry, TransportFactory, hookimpl
from gatewayd_mqtt.transport import MqttTransport

GATEWAYD_API_VERSION = "1.0"


@hookimpl
def gatewayd_register_transports(registry: Registry[TransportFactory]) -> None:
    """Offer ``plugin = "mqtt"`` for ``[transports.NAME]`` tables."""
    registry.add("mqtt", MqttTransport)
