"""Broker authentication: TLS client certificates and username/password by reference."""

from __future__ import annotations

import pytest
import structlog
from gatewayd_testing import MemoryTransportContext
from mosquitto import PASSWORD, Mosquitto
from mqtt_helpers import make_transport, running, tls_credentials

from gatewayd.api import ConfigError, CredentialError


async def test_refused_client_certificate_is_an_auth_failure(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    context.backends["broker"] = tls_credentials(broker, broker.certs.stranger)
    transport = make_transport(broker, context, tls=True)
    with structlog.testing.capture_logs() as logs, pytest.raises(CredentialError):
        await transport.start()
    failures = [e for e in logs if e["event"] == "mqtt.auth_failed"]
    assert len(failures) == 1
    assert not transport.connected


async def test_password_by_reference(
    broker: Mosquitto, context: MemoryTransportContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTT_TEST_PW", PASSWORD)
    transport = make_transport(
        broker, context, port=broker.auth_port, username="gw", password={"env": "MQTT_TEST_PW"}
    )
    async with running(transport):
        assert transport.connected
    assert "s3cret" not in repr(transport.config)


async def test_wrong_password_fails_the_start_without_retrying(
    broker: Mosquitto, context: MemoryTransportContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTT_TEST_PW", "wrong")
    transport = make_transport(
        broker, context, port=broker.auth_port, username="gw", password={"env": "MQTT_TEST_PW"}
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(CredentialError):
        await transport.start()
    failures = [e for e in logs if e["event"] == "mqtt.auth_failed"]
    assert len(failures) == 1
    assert "wrong" not in str(failures)


def test_inline_password_is_refused(broker: Mosquitto, context: MemoryTransportContext) -> None:
    with pytest.raises(ConfigError, match="inline secrets"):
        make_transport(broker, context, username="gw", password="plain")


def test_unknown_option_is_refused(broker: Mosquitto, context: MemoryTransportContext) -> None:
    with pytest.raises(ConfigError, match="uplink_topik"):
        make_transport(broker, context, uplink_topik="x/{device}")


def test_bad_template_is_refused(broker: Mosquitto, context: MemoryTransportContext) -> None:
    with pytest.raises(ConfigError, match="uplink_topic"):
        make_transport(broker, context, uplink_topic="devices/dev-{device}/up")


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("receive_maximum", 70_000, "at most 65535, got 70000"),
        ("uplink_qos", 3, "at most 2, got 3"),
        ("downlink_qos", -1, "at least 0, got -1"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_key(
    broker: Mosquitto, context: MemoryTransportContext, key: str, value: int, says: str
) -> None:
    with pytest.raises(ConfigError, match=f"transports\\.\\w+\\.{key}.*{says}"):
        make_transport(broker, context, **{key: value})
