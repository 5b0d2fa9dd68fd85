"""Config errors name the key path; the plugin registers itself; the lifecycle is clean."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gatewayd_http import plugin
from gatewayd_http.transport import HttpTransport
from structlog.testing import capture_logs

from gatewayd.api import ConfigError, GatewaydError, Registry, TransportFactory

LISTEN = {"listen": "127.0.0.1:0"}
TOKEN_REF = {"env": "TOKEN_SENSOR_1"}


def config_error(build: Any, options: dict[str, Any], devices: list[dict[str, Any]]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(options, devices)
    return info.value


def test_plugin_registers_http() -> None:
    registry: Registry[TransportFactory] = Registry("transport")
    plugin.gatewayd_register_transports(registry)
    assert registry.get("http") is HttpTransport


def test_missing_listen_names_the_key(build_transport: Any) -> None:
    err = config_error(build_transport, {}, [])
    assert err.key == "transports.web.listen"
    assert "required" in err.problem


@pytest.mark.parametrize("listen", ["8080", ":8080", "host:port", "127.0.0.1:70000"])
def test_bad_listen_names_the_key(build_transport: Any, listen: str) -> None:
    err = config_error(build_transport, {"listen": listen}, [])
    assert err.key == "transports.web.listen"


def test_ipv6_listen(build_transport: Any) -> None:
    transport = build_transport({"listen": "[::1]:8443"}, [])
    assert (transport.config.host, transport.config.port) == ("::1", 8443)


def test_inline_token_is_refused_naming_the_key(build_transport: Any) -> None:
    devices: list[dict[str, Any]] = [
        {"device": "sensor-1", "token": TOKEN_REF},
        {"device": "sensor-2", "token": "s3cret"},
    ]
    err = config_error(build_transport, LISTEN, devices)
    assert err.key == "transports.web.devices[1].token"
    assert "inline secrets are not allowed" in err.problem
    assert "s3cret" not in str(err)


def test_bearer_device_needs_a_token(build_transport: Any) -> None:
    err = config_error(build_transport, LISTEN, [{"device": "sensor-1"}])
    assert err.key == "transports.web.devices[0].token"


def test_unknown_keys_are_refused(build_transport: Any) -> None:
    err = config_error(build_transport, {**LISTEN, "max_bodyy": 5}, [])
    assert err.key == "transports.web.max_bodyy"
    devices = [{"device": "sensor-1", "token": TOKEN_REF, "webhok": "http://x/"}]
    assert config_error(build_transport, LISTEN, devices).key == "transports.web.devices[0].webhok"
    # identity only means something with client certificates
    devices = [{"device": "sensor-1", "token": TOKEN_REF, "identity": "urn:x"}]
    assert (
        config_error(build_transport, LISTEN, devices).key == "transports.web.devices[0].identity"
    )


def test_bad_values_name_their_key(build_transport: Any) -> None:
    assert (
        config_error(build_transport, {**LISTEN, "max_body": 0}, []).key
        == "transports.web.max_body"
    )
    err = config_error(build_transport, {**LISTEN, "device_auth": "basic"}, [])
    assert err.key == "transports.web.device_auth"
    devices = [{"device": "sensor-1", "token": TOKEN_REF, "webhook": "ftp://x/"}]
    assert config_error(build_transport, LISTEN, devices).key == "transports.web.devices[0].webhook"


def test_client_cert_needs_tls_and_identities(build_transport: Any) -> None:
    err = config_error(build_transport, {**LISTEN, "device_auth": "client_cert"}, [])
    assert err.key == "transports.web.device_auth"
    options = {**LISTEN, "device_auth": "client_cert", "tls": "devices"}
    err = config_error(build_transport, options, [{"device": "sensor-1"}])
    assert err.key == "transports.web.devices[0].identity"
    devices: list[dict[str, Any]] = [
        {"device": "a", "identity": "urn:x"},
        {"device": "b", "identity": "urn:x"},
    ]
    assert (
        config_error(build_transport, options, devices).key == "transports.web.devices[1].identity"
    )
    devices = [{"device": "a", "identity": "urn:x", "token": TOKEN_REF}]
    assert config_error(build_transport, options, devices).key == "transports.web.devices[0].token"


async def test_unset_token_variable_fails_start(build_transport: Any) -> None:
    transport = build_transport(LISTEN, [{"device": "sensor-1", "token": {"env": "NO_SUCH_VAR"}}])
    with pytest.raises(ConfigError) as info:
        await transport.start()
    assert info.value.key == "transports.web.devices[0].token"


async def test_shared_token_fails_start(build_transport: Any) -> None:
    devices = [{"device": "a", "token": TOKEN_REF}, {"device": "b", "token": TOKEN_REF}]
    transport = build_transport(LISTEN, devices)
    with pytest.raises(ConfigError) as info:
        await transport.start()
    assert info.value.key == "transports.web.devices[1].token"
    assert "tok-" not in str(info.value)


async def test_token_from_file(build_transport: Any, tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("file-token\n")
    transport = build_transport(LISTEN, [{"device": "a", "token": {"file": str(tmp_path / "tok")}}])
    await transport.start()
    try:
        host, port = transport.address
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://{host}:{port}/v1/devices/a/messages",
                json={"payload": "x"},
                headers={"Authorization": "Bearer file-token"},
            ) as resp,
        ):
            assert resp.status == 202
    finally:
        await transport.stop()


async def test_unknown_tls_credentials_fail_start(build_transport: Any) -> None:
    transport = build_transport({**LISTEN, "tls": "missing"}, [])
    with pytest.raises(ConfigError) as info:
        await transport.start()
    assert info.value.key == "credentials.missing"


async def test_port_in_use_fails_start_cleanly(build_transport: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        transport = build_transport({"listen": f"127.0.0.1:{port}"}, [])
        with pytest.raises(GatewaydError) as info:
            await transport.start()
    assert "transports.web.listen" in str(info.value)


async def test_stop_finishes_in_flight_then_refuses(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    host, port = transport.address
    target = f"http://{host}:{port}/v1/devices/sensor-1/messages"
    ctx.gate = asyncio.Event()
    async with aiohttp.ClientSession() as session:

        async def send() -> int:
            async with session.post(
                target,
                json={"payload": "x", "msgId": "late"},
                headers={"Authorization": "Bearer tok-sensor-1-secret"},
            ) as resp:
                return resp.status

        request = asyncio.create_task(send())
        await asyncio.wait_for(ctx.entered.wait(), 5)
        stopping = asyncio.create_task(transport.stop())
        await asyncio.sleep(0.1)
        # Intake is closed to new connections while the accepted request finishes.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(host, port)
        ctx.gate.set()
        assert await asyncio.wait_for(request, 5) == 202
        await asyncio.wait_for(stopping, 5)
    assert [u.msg_id for u in ctx.accepted] == ["late"]


async def test_cleartext_listener_off_loopback_warns(build_transport: Any) -> None:
    transport = build_transport({"listen": "0.0.0.0:0"}, [])
    with capture_logs() as logs:
        await transport.start()
        await transport.stop()
    events = [entry["event"] for entry in logs]
    assert "http.tls.disabled" in events
    assert events.index("http.listening") < events.index("http.stopped")
