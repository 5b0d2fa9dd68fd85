"""conf/gatewayd-mqtt.example.toml stays a valid configuration for the core and the plugin."""

from __future__ import annotations

from pathlib import Path

from gatewayd_mqtt.transport import MqttTransport
from gatewayd_testing import MemoryTransportContext

from gatewayd import config


def test_the_mqtt_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[3] / "conf" / "gatewayd-mqtt.example.toml"
    settings = config.load(example)
    assert settings.gateway_type == "N3G"
    (field,) = settings.transports
    assert field.plugin == "mqtt"
    assert field.service_id_template == "ue-{device}@iot.example.net"
    assert [d.name for d in field.devices] == ["sensor-1"]
    # The transport reads every option (a misspelt key would fail here, naming itself).
    transport = MqttTransport(field, MemoryTransportContext())
    cfg = transport.config
    assert (cfg.v5, cfg.uplink_qos, cfg.format) == (True, 1, "json")
    assert cfg.uplink.match("devices/sensor-1/up") == "sensor-1"
