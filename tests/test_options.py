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


# --- transports.NAME.pipeline -----------------------------------------------------------


def _with_pipeline(tmp_path: Path, pki: Pki, line: str) -> Path:
    """A config whose one transport table has ``line`` among its common keys."""
    transports = harness.http_transport_bearer().replace(
        'plugin = "http"\n', f'plugin = "http"\n{line}\n', 1
    )
    path = tmp_path / "gw.toml"
    path.write_text(
        harness.gateway_toml(
            pki, api_root="https://127.0.0.1:9", state_dir=tmp_path / "s", transports=transports
        )
    )
    return path


def test_pipeline_defaults_to_one_and_is_kept_from_the_plugin(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    (web,) = config.load(_with_pipeline(tmp_path, loopback_pki, "")).transports
    assert web.pipeline == 1
    (web,) = config.load(_with_pipeline(tmp_path, loopback_pki, "pipeline = 4")).transports
    assert web.pipeline == 4
    assert "pipeline" not in web.options  # a core key: the plugin never sees it


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "must be at least 1, got 0"),
        ("65", "must be at most 64, got 65"),
        ('"x"', "expected an integer, got a string"),
        ("true", "expected an integer, got a boolean"),
    ],
)
def test_a_bad_pipeline_is_refused_naming_the_key(
    tmp_path: Path, loopback_pki: Pki, value: str, problem: str
) -> None:
    path = _with_pipeline(tmp_path, loopback_pki, f"pipeline = {value}")
    with pytest.raises(ConfigError) as refused:
        config.load(path)
    assert str(refused.value) == f"{path}: transports.web.pipeline: {problem}"
