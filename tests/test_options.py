"""Typed config reading: listen addresses, and misspelt keys in optional tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki

from gatewayd import config
from gatewayd.errors import ConfigError
from gatewayd.options import ListenAddress, Options


@pytest.mark.parametrize(
    ("text", "expected", "loopback"),
    [
        ("127.0.0.1:8080", ListenAddress("127.0.0.1", 8080), True),
        ("[::1]:0", ListenAddress("::1", 0), True),
        ("localhost:9", ListenAddress("localhost", 9), True),
        ("0.0.0.0:8444", ListenAddress("0.0.0.0", 8444), False),  # noqa: S104
        ("gw.example.net:8444", ListenAddress("gw.example.net", 8444), False),
    ],
)
def test_listen_addresses(text: str, expected: ListenAddress, loopback: bool) -> None:
    listen = Options({"listen": text}, "api", source="gw.toml").get_listen("listen")
    assert listen == expected
    assert listen.is_loopback is loopback
    assert str(listen) == text


@pytest.mark.parametrize("text", [":8444", "8444", "127.0.0.1:http", "127.0.0.1:70000"])
def test_bad_listen_address_names_the_key(text: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Options({"listen": text}, "api", source="gw.toml").get_listen("listen")
    assert str(refused.value) == f'gw.toml: api.listen: expected "host:port", got {text!r}'


def test_misspelt_key_in_metrics_without_listen_is_refused(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    text = harness.gateway_toml(
        loopback_pki,
        api_root="https://127.0.0.1:9",
        state_dir=tmp_path / "s",
        transports=harness.http_transport_bearer(),
        extra='[metrics]\nlisen = "127.0.0.1:9464"\n',
    )
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"metrics\.lisen: unknown key"):
        config.load(path)
