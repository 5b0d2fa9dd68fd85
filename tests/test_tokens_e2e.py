"""OAuth 2.0 tokens on both legs, end to end (TS 33.501 13.4.1, Annex Y.5).

The gateway gets its token from the reference server's token endpoint through the
``oauth2`` credential backend, sends it on every MSGS call, and checks the server's own
token on every call to its MSGG API. Everything is real: sockets, mutual TLS, the token
endpoint, the signatures. The token is fetched once and cached, and never logged.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from e2e_device import Device
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki, http_transport_mtls
from gatewayd_sim.schemas import validate
from gatewayd_sim.server import SimServer
from gatewayd_sim.settings import load as sim_load
from gatewayd_sim.tokens import SimTokens, TokenClient
from gatewayd_testing import running_gateway
from structlog.testing import capture_logs

from gatewayd import pki
from gatewayd.errors import ConfigError
from gatewayd.options import SecretRef
from gatewayd.security.tls import client_context
from gatewayd.security.tokens import cert_thumbprint

ISSUER = "https://nrf.sim.example/oauth2"
CLIENT_SECRET = "sim-client-secret-7f3a"


def _pem(key: pki.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: pki.PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _der(pem_path: Path) -> bytes:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def _gateway_toml(tmp_path: Path, tls: Pki, sim: SimServer, transports: str, oauth2: str) -> str:
    """The demo gateway, with its MSGS token from ``[credentials.tokens]`` and the sim's
    token required on its own API."""
    assert sim.tokens is not None
    verification_key = tmp_path / "sim-token-key.pub.pem"
    verification_key.write_bytes(sim.tokens.issuer.public_key_pem)
    text = harness.gateway_toml(
        tls,
        api_root=sim.api_root,
        state_dir=tmp_path / "state",
        transports=transports,
        extra=f"""
[credentials.tokens]
plugin = "oauth2"
token_url = "{sim.api_root}/oauth2/token"
client_id = "{pki.DEMO_GATEWAY_ID}"
trust = "northbound"
identity = "northbound"
{oauth2}

[api.token]
issuer = "{ISSUER}"
key = "{verification_key}"
require = true
""",
    )
    # [northbound] is already written above: name the token backend inside it.
    return text.replace("[northbound]\n", '[northbound]\ntoken = "tokens"\n', 1)


async def _uplink_downlink_reports(sim: SimServer, device: Device, port: int) -> None:
    """The whole message path, as in test_end_to_end, every MSGS/MSGG call with a token."""
    status, answer = await device.send(
        port, "sensor-1", {"payload": "t=21.5", "msgId": "up-1", "deliveryReport": True}
    )
    assert (status, answer["msgId"]) == (202, "up-1")
    await sim.wait_for(lambda: len(sim.uplinks) == 1, timeout=10)
    assert sim.uplinks[0].message.ori_addr.addr == DEMO_SERVICE_ID
    report = await device.next()  # the sim's report, pushed to the gateway with its token
    assert (report["msgId"], report["delivered"]) == ("up-1", True)

    push = await sim.send_downlink(
        DEMO_SERVICE_ID, "set-interval=60", deliv_st_req_ind=True, msg_id="down-1"
    )
    assert push.status == 204, push.error
    got = await device.next()
    assert (got["msgId"], got["payload"]) == ("down-1", "set-interval=60")
    await sim.wait_for(lambda: len(sim.reports) == 1, timeout=10)
    assert sim.reports[0].report.msg_id == "down-1"


def _assert_tokens_never_logged(logs: list[dict[str, Any]], sim: SimServer) -> None:
    tokens = [grant.token for grant in sim.token_grants]
    assert tokens
    for entry in logs:
        text = repr(entry)
        for token in tokens:
            # Neither the token nor its signature part (the secret-bearing bit) appears.
            assert token not in text
            assert token.rsplit(".", 1)[1] not in text


async def _run(tmp_path: Path, tls: Pki, tokens: SimTokens, oauth2: str) -> SimServer:
    device = Device(tls)
    async with (
        SimServer(harness.sim_settings(tls, tokens=tokens), schema_check=True) as sim,
        device.serving(),
    ):
        settings = harness.write_config(
            tmp_path / "gw.toml",
            _gateway_toml(tmp_path, tls, sim, http_transport_mtls(tls, device.webhook), oauth2),
        )
        assert settings.api.token is not None
        with capture_logs() as logs:
            async with running_gateway(settings) as gw:
                await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
                _, port = gw.transports["web"].address  # type: ignore[attr-defined]
                await _uplink_downlink_reports(sim, device, port)
            # A clean stop deregisters: that call carried the (cached) token too.
            assert sim.registrations == []
        _assert_tokens_never_logged(logs, sim)
        assert not [e for e in logs if e["event"] == "auth.token_rejected"]
        return sim


def _sim_tokens(key: pki.PrivateKey, **kwargs: Any) -> SimTokens:
    return SimTokens(issuer=ISSUER, key_pem=_pem(key), required=True, **kwargs)


async def test_tls_client_auth_tokens_on_both_legs(tmp_path: Path, loopback_pki: Pki) -> None:
    sim = await _run(
        tmp_path,
        loopback_pki,
        _sim_tokens(pki.new_key("ec")),
        'auth_method = "tls_client_auth"\nrequest_format = "rfc6749"',
    )
    endpoint = [g for g in sim.token_grants if g.kind == "endpoint"]
    # One token for registration, uplink, report and deregistration: it was cached.
    assert sim.token_requests == 1
    assert len(endpoint) == 1
    grant = endpoint[0]
    assert (grant.client_id, grant.auth_method) == (pki.DEMO_GATEWAY_ID, "tls_client_auth")
    assert grant.audience == "127.0.0.1"  # the server name the gateway calls
    claims = jwt.decode(grant.token, options={"verify_signature": False})
    assert claims["sub"] == pki.DEMO_GATEWAY_ID
    assert set(claims["scope"].split()) == {"msgs-msgdelivery", "msgs-gwregistration"}
    assert {"iss", "sub", "aud", "scope", "exp", "iat", "jti"} <= set(claims)
    # Bound to the gateway's certificate: useless over any other TLS connection.
    assert claims["cnf"] == {"x5t#S256": cert_thumbprint(_der(loopback_pki["gateway"]))}
    # The sim's own token for its pushes: audience the gateway, scope its MSGG API.
    pushes = [g for g in sim.token_grants if g.kind == "push"]
    assert [(g.audience, g.scope) for g in pushes] == [(pki.DEMO_GATEWAY_ID, "msgg-n3gdelivery")]


async def test_private_key_jwt_tokens_in_3gpp_form(tmp_path: Path, loopback_pki: Pki) -> None:
    client_key = pki.new_key("ec")
    key_path = tmp_path / "gw-assertion.key"
    pki.write_private(key_path, _pem(client_key))
    tokens = _sim_tokens(
        pki.new_key("ec"),
        clients=(
            TokenClient(client_id=pki.DEMO_GATEWAY_ID, public_key_pem=_public_pem(client_key)),
        ),
    )
    sim = await _run(
        tmp_path,
        loopback_pki,
        tokens,
        f'auth_method = "private_key_jwt"\nsigning_key = "{key_path}"\nrequest_format = "3gpp"',
    )
    endpoint = [g for g in sim.token_grants if g.kind == "endpoint"]
    assert sim.token_requests == 1
    assert [(g.client_id, g.auth_method) for g in endpoint] == [
        (pki.DEMO_GATEWAY_ID, "private_key_jwt")
    ]


# --- the token endpoint on its own --------------------------------------------------------


async def _token_request(
    sim: SimServer, tls: Pki, form: dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    ctx = client_context(tls.trust(), tls.identity("gateway"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sim.api_root}/oauth2/token", data=form, headers=headers or {}, ssl=ctx
        ) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


def _basic(user: str, password: str) -> dict[str, str]:
    # RFC 6749 2.3.1: both parts form-encoded first (a URN client id has colons).
    pair = f"{quote_plus(user)}:{quote_plus(password)}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> SecretRef:
    monkeypatch.setenv("SIM_TEST_CLIENT_SECRET", CLIENT_SECRET)
    return SecretRef("env", "SIM_TEST_CLIENT_SECRET", "tokens.clients[0].secret")


async def test_token_endpoint_client_secret_basic_and_errors(
    loopback_pki: Pki, secret_env: SecretRef
) -> None:
    tokens = _sim_tokens(
        pki.new_key("ec"), clients=(TokenClient(client_id="urn:client:a", secret=secret_env),)
    )
    async with SimServer(harness.sim_settings(loopback_pki, tokens=tokens)) as sim:
        form = {"grant_type": "client_credentials", "scope": "msgs-msgdelivery"}
        with capture_logs() as logs:
            status, body, headers = await _token_request(
                sim, loopback_pki, form, _basic("urn:client:a", CLIENT_SECRET)
            )
            assert status == 200
            validate("TS29510_Nnrf_AccessToken.yaml", "AccessTokenRsp", body)
            assert (body["token_type"], body["scope"]) == ("Bearer", "msgs-msgdelivery")
            assert (headers["Cache-Control"], headers["Pragma"]) == ("no-store", "no-cache")

            status, body, headers = await _token_request(
                sim, loopback_pki, form, _basic("urn:client:a", "wrong")
            )
            assert (status, body["error"]) == (401, "invalid_client")
            assert headers["WWW-Authenticate"].startswith("Basic")

            bad_scope = {**form, "scope": "msgs-asregistration"}
            status, body, _ = await _token_request(
                sim, loopback_pki, bad_scope, _basic("urn:client:a", CLIENT_SECRET)
            )
            assert (status, body["error"]) == (400, "invalid_scope")

            # 3GPP form, tls_client_auth: the certificate must be the claimed instance.
            status, body, _ = await _token_request(
                sim,
                loopback_pki,
                {
                    "grant_type": "client_credentials",
                    "nfInstanceId": pki.DEMO_DEVICE_ID,
                    "scope": "msgs-msgdelivery",
                },
            )
            assert (status, body["error"]) == (401, "invalid_client")
            status, body, _ = await _token_request(
                sim, loopback_pki, {**form, "grant_type": "password"}
            )
            assert (status, body["error"]) == (400, "unsupported_grant_type")
        refused = [e["error"] for e in logs if e["event"] == "sim.token.refused"]
        assert refused == [
            "invalid_client",
            "invalid_scope",
            "invalid_client",
            "unsupported_grant_type",
        ]
        assert not any(CLIENT_SECRET in repr(e) for e in logs)
        assert sim.token_requests == 5
        assert len(sim.token_grants) == 1


def test_sim_tokens_settings_from_toml(
    tmp_path: Path, loopback_pki: Pki, secret_env: SecretRef
) -> None:
    token_key = tmp_path / "token-signing.key"
    pki.write_private(token_key, _pem(pki.new_key("ec")))
    client_key = tmp_path / "client.pub.pem"
    client_key.write_bytes(_public_pem(pki.new_key("ec")))
    base = (
        f'[tls]\ncert = "{loopback_pki["server"]}"\nkey = "{loopback_pki["server_key"]}"\n'
        f'client_cert = "{loopback_pki["server_client"]}"\n'
        f'client_key = "{loopback_pki["server_client_key"]}"\n'
        f'ca = "{loopback_pki["ca"]}"\n'
    )
    tokens = (
        f'[tokens]\nissuer = "{ISSUER}"\nkey = "{token_key}"\nttl = 120\nrequired = true\n'
        '[[tokens.clients]]\nid = "urn:client:a"\n'
        'secret = { env = "SIM_TEST_CLIENT_SECRET" }\n'
        f'public_key = "{client_key}"\n'
    )
    conf = tmp_path / "sim.toml"
    conf.write_text(base + tokens, encoding="utf-8")
    loaded = sim_load(conf).tokens
    assert loaded is not None
    assert (loaded.issuer, loaded.algorithm, loaded.ttl, loaded.required) == (
        ISSUER,
        "ES256",
        120.0,
        True,
    )
    (client,) = loaded.clients
    assert (client.client_id, client.secret) == ("urn:client:a", secret_env)
    assert client.public_key_pem == client_key.read_bytes()
    # Errors name the key: an inline secret, an algorithm that does not fit the key.
    conf.write_text(base + tokens.replace('{ env = "SIM_TEST_CLIENT_SECRET" }', '"x"'))
    with pytest.raises(ConfigError, match=r"tokens\.clients\[0\]\.secret: inline secrets"):
        sim_load(conf)
    conf.write_text(base + tokens.replace("ttl = 120", 'algorithm = "RS256"'))
    with pytest.raises(ConfigError, match=r"tokens\.algorithm"):
        sim_load(conf)
    # Without the table the sim has no token endpoint and asks for no token.
    conf.write_text(base)
    assert sim_load(conf).tokens is None
