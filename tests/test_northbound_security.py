"""Mutual authentication on the northbound link, both directions (TR 33.862 key issue #4).

An unverified peer must learn nothing: an impostor server receives no HTTP byte at
all (no registration, no Service ID), and the gateway's API refuses a caller before it
reads a body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.schemas import validate_problem
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway
from impostor import Impostor
from structlog.testing import capture_logs

from gatewayd import config, pki
from gatewayd.api import client_context, server_context
from gatewayd.daemon import Gateway
from gatewayd.errors import (
    CredentialError,
    ExitCode,
    PeerRefusedError,
    PeerUnavailableError,
    RequestRejectedError,
)
from gatewayd.msgin5g.registration import GatewayRegistration
from gatewayd.northbound.client import MsgsClient
from gatewayd.plugins import Plugins

TRANSPORT = harness.http_transport_bearer()


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAYD_TEST_TOKEN", "device-secret-1")


def _settings(tmp_path: Path, tls: Pki, api_root: str) -> config.Settings:
    return harness.write_config(
        tmp_path / "gw.toml",
        harness.gateway_toml(
            tls, api_root=api_root, state_dir=tmp_path / "state", transports=TRANSPORT
        ),
    )


@pytest.mark.parametrize("kind", ["unknown CA", "wrong identity"])
async def test_impostor_server_learns_nothing(tmp_path: Path, loopback_pki: Pki, kind: str) -> None:
    if kind == "unknown CA":
        other_ca = pki.create_ca("someone else's CA")
        cert = pki.issue(other_ca, "m5s", dns=("localhost",), ips=("127.0.0.1",))
    else:
        ca = pki.load_ca(loopback_pki["ca"], loopback_pki["ca_key"])
        cert = pki.issue(ca, "impostor", dns=("impostor.example",), uris=(pki.DEMO_SERVER_ID,))
    impostor = Impostor.presenting(cert)
    async with impostor.running():
        settings = _settings(tmp_path, loopback_pki, f"https://127.0.0.1:{impostor.port}")
        with capture_logs() as logs, pytest.raises(PeerRefusedError) as refused:
            await Gateway(settings, Plugins()).run()
    assert refused.value.exit_code == ExitCode.PEER_REFUSED
    assert impostor.connections >= 1, "the gateway never even tried"
    assert impostor.received == b"", "an unverified server received HTTP bytes"
    rejected = [e for e in logs if e["event"] == "auth.peer_rejected"]
    assert rejected
    assert rejected[0]["direction"] == "outbound"
    # Nothing in the log line names a Service ID either.
    assert not any(DEMO_SERVICE_ID in str(e) for e in rejected)


async def test_gateway_not_on_allow_list_is_refused_with_403(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    settings_sim = harness.sim_settings(loopback_pki, gateway_id="urn:gatewayd:gateway:other")
    async with SimServer(settings_sim, schema_check=True) as sim:
        settings = _settings(tmp_path, loopback_pki, sim.api_root)
        with capture_logs() as logs, pytest.raises(PeerRefusedError) as refused:
            await Gateway(settings, Plugins()).run()
    assert "403" in str(refused.value)
    assert refused.value.exit_code == ExitCode.PEER_REFUSED
    assert sim.registrations == []
    assert any(e["event"] == "auth.refused_by_peer" and e["status"] == 403 for e in logs)


async def _call_api(port: int, ctx: object, body: object) -> tuple[int, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"https://localhost:{port}/msgg-n3gdelivery/v1/deliver-message",
            json=body,
            ssl=ctx,  # type: ignore[arg-type]
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


MESSAGE = {
    "oriAddr": {"addrType": "AS", "addr": "as-1"},
    "destAddr": {"addrType": "UE", "addr": DEMO_SERVICE_ID},
    "msgId": "m-1",
    "payload": "hello",
}


async def test_api_refuses_caller_without_client_certificate(
    loopback_pki: Pki, sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    async with running_gateway(gateway_config(TRANSPORT)) as gw:
        assert gw.api_port is not None
        no_cert = client_context(loopback_pki.trust())
        # TLS 1.3: the server's refusal of a missing certificate shows on the first read.
        with pytest.raises(aiohttp.ClientError):
            await _call_api(gw.api_port, no_cert, MESSAGE)


async def test_api_refuses_authenticated_peer_not_allowed(
    loopback_pki: Pki, sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    async with running_gateway(gateway_config(TRANSPORT)) as gw:
        assert gw.api_port is not None
        # A valid certificate from the right CA, but the device's, not the server's.
        device = client_context(loopback_pki.trust(), loopback_pki.identity("device"))
        with capture_logs() as logs:
            status, body = await _call_api(gw.api_port, device, MESSAGE)
        assert status == 403
        validate_problem(body)
        assert body == {"title": "Forbidden", "status": 403, "cause": "PEER_NOT_ALLOWED"}
        event = next(e for e in logs if e["event"] == "auth.peer_rejected")
        assert event["peer"] == pki.DEMO_DEVICE_ID


async def test_api_validates_and_authorizes_bodies(
    loopback_pki: Pki, sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    async with running_gateway(gateway_config(TRANSPORT)) as gw:
        assert gw.api_port is not None
        server = client_context(loopback_pki.trust(), loopback_pki.identity("server_client"))
        status, body = await _call_api(gw.api_port, server, {**MESSAGE, "msgId": 5})
        assert status == 400
        validate_problem(body)
        assert body["invalidParams"] == [{"param": "/msgId", "reason": "must be a string"}]  # type: ignore[index]
        other = {**MESSAGE, "destAddr": {"addrType": "UE", "addr": "ue-not-ours"}}
        status, body = await _call_api(gw.api_port, server, other)
        assert status == 403
        validate_problem(body)
        # Unknown enumeration values are tolerated (open enums), not rejected.
        odd = {**MESSAGE, "msgId": "m-odd", "oriAddr": {"addrType": "FUTURE", "addr": "x"}}
        status, _ = await _call_api(gw.api_port, server, odd)
        assert status == 204


async def test_gateway_refuses_to_start_as_someone_else(tmp_path: Path, loopback_pki: Pki) -> None:
    settings = harness.write_config(
        tmp_path / "gw.toml",
        harness.gateway_toml(
            loopback_pki,
            api_root="https://127.0.0.1:9",
            state_dir=tmp_path / "state",
            transports=TRANSPORT,
            gateway_id="urn:gatewayd:gateway:not-me",
        ),
    )
    with pytest.raises(CredentialError) as refused:
        await Gateway(settings, Plugins()).run()
    assert refused.value.exit_code == ExitCode.CREDENTIALS
    assert "urn:gatewayd:gateway:not-me" in str(refused.value)
    assert pki.DEMO_GATEWAY_ID in str(refused.value)  # it says what the certificate holds


@pytest.mark.parametrize("expected", [pki.DEMO_SERVER_ID, "urn:gatewayd:msgin5g-server:other"])
async def test_expected_server_identity_is_checked_in_the_handshake(
    tmp_path: Path, loopback_pki: Pki, expected: str
) -> None:
    """northbound.server_identity: the identity (an NF instance id) the server must have."""
    async with SimServer(harness.sim_settings(loopback_pki), schema_check=True) as sim:
        settings = harness.write_config(
            tmp_path / "gw.toml",
            harness.gateway_toml(
                loopback_pki,
                api_root=sim.api_root,
                state_dir=tmp_path / "state",
                transports=TRANSPORT,
            ).replace(
                f'server_identity = "{pki.DEMO_SERVER_ID}"', f'server_identity = "{expected}"'
            ),
        )
        assert settings.northbound.server_identity == expected
        if expected == pki.DEMO_SERVER_ID:
            async with running_gateway(settings):
                await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            return
        with capture_logs() as logs, pytest.raises(PeerRefusedError):
            await Gateway(settings, Plugins()).run()
        assert sim.registrations == []
    rejected = [e for e in logs if e["event"] == "auth.peer_rejected"]
    assert rejected
    assert expected in str(rejected[0])


def _msgs_client(tls: Pki, port: int) -> MsgsClient:
    """The gateway's northbound client, as the daemon builds it, toward localhost:port."""
    ctx = client_context(tls.trust(), tls.identity("gateway"), expected_identity=pki.DEMO_SERVER_ID)
    return MsgsClient(
        f"https://localhost:{port}", ctx, server_name="localhost", timeout=5.0, max_connections=2
    )


async def test_northbound_client_does_not_follow_a_redirect(loopback_pki: Pki) -> None:
    """Issue 8 finding 4: a 307 from https to http must not re-send the registration."""
    seen: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response({}, status=201, headers={"Location": "/r/1"})

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"http://127.0.0.1:{plain}/stolen"})

    plain_app, tls_app = web.Application(), web.Application()
    plain_app.router.add_route("*", "/stolen", record)
    tls_app.router.add_route("*", "/{tail:.*}", redirect)
    runners = [web.AppRunner(plain_app), web.AppRunner(tls_app)]
    for runner in runners:
        await runner.setup()
    await web.TCPSite(runners[0], "127.0.0.1", 0).start()
    plain = runners[0].addresses[0][1]
    server_ctx = server_context(loopback_pki.identity("server"), loopback_pki.trust())
    await web.TCPSite(runners[1], "127.0.0.1", 0, ssl_context=server_ctx).start()
    client = _msgs_client(loopback_pki, runners[1].addresses[0][1])
    registration = GatewayRegistration(
        gw_id=pki.DEMO_GATEWAY_ID,
        gw_type="N3G",
        target_uri="https://localhost:1",
        ue_svc_ids=(DEMO_SERVICE_ID,),
    )
    try:
        with capture_logs() as logs, pytest.raises(RequestRejectedError) as refused:
            await client.register(registration)
    finally:
        await client.aclose()
        for runner in runners:
            await runner.cleanup()
    assert refused.value.status == 307
    assert seen == [], "the registration was re-sent to the redirect target"
    assert any(e["event"] == "northbound.redirect_refused" for e in logs)


async def test_a_server_that_never_answers_tls_is_unreachable_not_a_refusal(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    """Issue 8: a listener that takes the connection and closes it without a word of
    TLS (overloaded, cutting new connections, not TLS) refused no certificate: the
    gateway must keep retrying, not stop with exit 3."""
    accepted = 0

    async def close_unanswered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read(65536)  # the ClientHello, never answered
        writer.close()

    server = await asyncio.start_server(close_unanswered, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = _msgs_client(loopback_pki, port)
    try:
        with capture_logs() as logs, pytest.raises(PeerUnavailableError) as unavailable:
            await client.deregister("/msgs-gwregistration/v1/registrations/1")
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert not isinstance(unavailable.value, PeerRefusedError)
    assert "without answering TLS" in str(unavailable.value)
    assert accepted >= 2
    assert not any(e["event"] == "auth.refused_by_peer" for e in logs)
    assert any(e["event"] == "northbound.unreachable" for e in logs)
