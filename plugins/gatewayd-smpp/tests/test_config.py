"""Config errors name their key path; the password is never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import SmsContext, base_options, make_settings
from gatewayd_smpp.transport import SmppTransport

from gatewayd import config
from gatewayd.api import ConfigError, GatewaydError


def build(options: dict[str, Any], devices: list[str] | None = None) -> SmppTransport:
    settings = make_settings(options, devices)
    return SmppTransport(settings, SmsContext(settings.devices))


def test_defaults() -> None:
    cfg = build(base_options(2775)).config
    assert (cfg.window, cfg.data_coding, cfg.receipts, cfg.part_ack) == (
        10,
        "auto",
        True,
        "after_store",
    )
    assert (cfg.dest_ton, cfg.dest_npi) == (1, 1)
    assert "password" not in repr(cfg)


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        ({"host": None}, "transports.sms.host", "is required"),
        ({"password": "inline"}, "transports.sms.password", "inline secrets are not allowed"),
        ({"system_id": "x" * 16}, "transports.sms.system_id", "at most 15"),
        ({"port": 70000}, "transports.sms.port", "at most 65535"),
        ({"window": 0}, "transports.sms.window", "at least 1"),
        ({"data_coding": "latin1"}, "transports.sms.data_coding", "expected one of auto, ucs2"),
        ({"part_ack": "never"}, "transports.sms.part_ack", "after_store, on_arrival"),
        ({"source_addr_ton": 300}, "transports.sms.source_addr_ton", "at most 255"),
        ({"reciepts": True}, "transports.sms.reciepts", "unknown key"),
        ({"reconnect_max": 0.01}, "transports.sms.reconnect_max", "reconnect_initial"),
    ],
)
def test_errors_name_the_key(change: dict[str, Any], key: str, problem: str) -> None:
    options = base_options(2775)
    for name, value in change.items():
        if value is None:
            del options[name]
        else:
            options[name] = value
    with pytest.raises(ConfigError) as caught:
        build(options)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_device_must_be_an_msisdn() -> None:
    with pytest.raises(ConfigError) as caught:
        build(base_options(2775), devices=["447700900001", "+44 7700"])
    assert caught.value.key == "transports.sms.devices[1].device"


async def test_password_longer_than_smpp_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMPP_TEST_PASSWORD", "much-too-long")
    transport = build(base_options(2775))
    with pytest.raises(GatewaydError, match=r"transports\.sms\.password") as caught:
        await transport.start()
    assert "much-too-long" not in str(caught.value)


async def test_unset_password_variable_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMPP_TEST_PASSWORD")
    with pytest.raises(ConfigError) as caught:
        await build(base_options(2775)).start()
    assert caught.value.key == "transports.sms.password"


def test_the_l3g_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[3] / "conf" / "gatewayd-l3g.example.toml"
    settings = config.load(example)
    assert settings.gateway_type == "L3G"
    (sms,) = settings.transports
    transport = SmppTransport(sms, SmsContext(sms.devices))
    assert transport.config.source.ton == 3
    assert transport.config.password.kind == "credential"
    assert sms.service_id_template == "msisdn-{device}@sms.example.net"


def test_tls_credentials_need_tls() -> None:
    with pytest.raises(ConfigError) as caught:
        build(base_options(2775, tls_credentials="smsc"))
    assert caught.value.key == "transports.sms.tls_credentials"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("binds", 0),
        ("binds", 33),
        ("bind_mode", "tx"),
        ("mt_field", "udh"),
        ("max_rate", -1.0),
        ("submit_id_format", "octal"),
        ("receipt_id_format", 16),
    ],
)
def test_new_keys_are_checked(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        build(base_options(2775, **{key: value}))
    assert caught.value.key == f"transports.sms.{key}"
