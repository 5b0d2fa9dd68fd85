"""The oauth2 backend against a real HTTPS token endpoint that issues real JWTs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from gatewayd_oauth2.backend import OAuth2Backend
from gatewayd_testing import StaticCredentials
from structlog.testing import capture_logs

from gatewayd import pki
from gatewayd.api import ConfigError, CredentialError, TrustAnchors
from gatewayd.plugins import Plugins
from gatewayd.security.tokens import verify_token

AUDIENCE = "MSGS"
SCOPE = "msgs-msgdelivery"


def test_plugin_registers_backend() -> None:
    assert Plugins(autoload=True).credential_backends.get("oauth2") is OAuth2Backend


async def test_client_secret_basic_and_cache(
    make: Any, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAUTH_SECRET", "client-secret-value-42")
    backend = make({"auth_method": "client_secret_basic", "client_secret": {"env": "OAUTH_SECRET"}})
    await backend.load()
    with capture_logs() as logs:
        token = await backend.access_token(audience=AUDIENCE, scope=SCOPE)
        again = await backend.access_token(audience=AUDIENCE, scope=SCOPE)
    assert token == again
    assert endpoint.requests == 1
    claims = verify_token(token, endpoint.issuer.policy(audience=AUDIENCE), peer_cert_der=None)
    assert claims.subject == "urn:gatewayd:gateway:demo-n3g"
    assert claims.scopes == {SCOPE}
    assert endpoint.forms[0] == {
        "grant_type": "client_credentials",
        "scope": SCOPE,
        "audience": AUDIENCE,
    }
    # Neither the token nor the secret reaches the log.
    assert [e["event"] for e in logs] == ["oauth2.token.refreshed"]
    assert token not in repr(logs)
    assert "client-secret-value-42" not in repr(logs)
    # Another scope is another token.
    other = await backend.access_token(audience=AUDIENCE, scope="msgs-asregistration")
    assert other != token
    assert endpoint.requests == 2


async def test_private_key_jwt_with_local_key(make: Any, endpoint: Any, tmp_path: Path) -> None:
    key = pki.new_key("ec")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"kpass"),
    )
    (tmp_path / "client.key").write_bytes(pem)
    (tmp_path / "kpass").write_text("kpass\n")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    endpoint.assertion_keys["urn:gatewayd:gateway:demo-n3g"] = public
    backend = make(
        {
            "auth_method": "private_key_jwt",
            "signing_key": "client.key",
            "signing_key_passphrase": {"file": str(tmp_path / "kpass")},
            "key_id": "gw-1",
        }
    )
    await backend.load()
    assert backend.watched_paths() == (tmp_path / "client.key",)
    token = await backend.access_token(audience=AUDIENCE, scope=SCOPE)
    assert verify_token(token, endpoint.issuer.policy(audience=AUDIENCE), peer_cert_der=None)
    form = endpoint.forms[0]
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    header = jwt.get_unverified_header(form["client_assertion"])
    assert header == {"alg": "ES256", "typ": "JWT", "kid": "gw-1"}
    claims = jwt.decode(
        form["client_assertion"], public, algorithms=["ES256"], audience=endpoint.url
    )
    assert claims["iss"] == claims["sub"] == "urn:gatewayd:gateway:demo-n3g"
    assert 0 < claims["exp"] - claims["iat"] <= 60
    # Every assertion is single-use: a new jti each time.
    first, second = await backend.client_assertion(), await backend.client_assertion()
    assert (
        jwt.decode(first, options={"verify_signature": False})["jti"]
        != jwt.decode(second, options={"verify_signature": False})["jti"]
    )


async def test_tls_client_auth_binds_token(make: Any, endpoint: Any, certs: Any) -> None:
    backend = make(
        {"auth_method": "tls_client_auth", "identity": "northbound", "trust": "northbound"}
    )
    await backend.load()
    token = await backend.access_token(audience=AUDIENCE, scope=SCOPE)
    assert endpoint.forms[0]["client_id"] == "urn:gatewayd:gateway:demo-n3g"
    policy = endpoint.issuer.policy(audience=AUDIENCE, require_cnf=True)
    claims = verify_token(token, policy, peer_cert_der=certs.client_der)
    assert claims.cert_thumbprint is not None


async def test_3gpp_request_format(
    make: Any, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAUTH_SECRET", "client-secret-value-42")
    backend = make(
        {
            "auth_method": "client_secret_basic",
            "client_secret": {"env": "OAUTH_SECRET"},
            "request_format": "3gpp",
            "nf_type": "AF",
        }
    )
    await backend.load()
    await backend.access_token(audience="MSGS", scope="msgs-msgdelivery msgs-asregistration")
    assert endpoint.forms[0] == {
        "grant_type": "client_credentials",
        "nfInstanceId": "urn:gatewayd:gateway:demo-n3g",
        "nfType": "AF",
        "targetNfType": "MSGS",
        "scope": "msgs-msgdelivery msgs-asregistration",
    }


async def test_single_flight(make: Any, endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAUTH_SECRET", "client-secret-value-42")
    backend = make({"auth_method": "client_secret_basic", "client_secret": {"env": "OAUTH_SECRET"}})
    await backend.load()
    endpoint.delay = 0.2  # every caller arrives while the one request is in flight
    tokens = await asyncio.gather(
        *(backend.access_token(audience=AUDIENCE, scope=SCOPE) for _ in range(25))
    )
    assert endpoint.requests == 1
    assert len(set(tokens)) == 1
    # A caller that gives up does not cancel the request the others share.
    endpoint.delay = 0.2
    waiter = asyncio.create_task(backend.access_token(audience=AUDIENCE, scope="s2"), name="w1")
    patient = asyncio.create_task(backend.access_token(audience=AUDIENCE, scope="s2"), name="w2")
    await asyncio.sleep(0.05)
    waiter.cancel()
    assert await patient
    assert endpoint.requests == 2


async def test_refresh_before_expiry(
    make: Any, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAUTH_SECRET", "client-secret-value-42")
    backend = make(
        {
            "auth_method": "client_secret_basic",
            "client_secret": {"env": "OAUTH_SECRET"},
            "refresh_margin": 60,
        }
    )
    await backend.load()
    endpoint.lifetime = 2  # the margin is capped at half the lifetime: refresh after 1 s
    first = await backend.access_token(audience=AUDIENCE, scope=SCOPE)
    assert await backend.access_token(audience=AUDIENCE, scope=SCOPE) == first
    assert endpoint.requests == 1
    await asyncio.sleep(1.1)
    second = await backend.access_token(audience=AUDIENCE, scope=SCOPE)
    assert second != first
    assert endpoint.requests == 2


async def test_endpoint_error_names_oauth_code(
    make: Any, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAUTH_SECRET", "client-secret-value-42")
    backend = make({"auth_method": "client_secret_basic", "client_secret": {"env": "OAUTH_SECRET"}})
    await backend.load()
    endpoint.fail = (400, {"error": "invalid_scope", "error_description": "no such scope"})
    with capture_logs() as logs, pytest.raises(CredentialError) as info:
        await backend.access_token(audience=AUDIENCE, scope="admin")
    assert "invalid_scope" in str(info.value)
    assert "HTTP 400" in str(info.value)
    assert logs[0]["event"] == "oauth2.token.refused"
    assert logs[0]["error"] == "invalid_scope"
    # A failure is not cached: the next call asks again and succeeds.
    endpoint.fail = None
    assert await backend.access_token(audience=AUDIENCE, scope=SCOPE)
    assert endpoint.requests == 2


async def test_wrong_secret_is_invalid_client(
    make: Any, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAUTH_SECRET", "not-the-secret")
    backend = make({"auth_method": "client_secret_basic", "client_secret": {"env": "OAUTH_SECRET"}})
    await backend.load()
    with pytest.raises(CredentialError, match="invalid_client") as info:
        await backend.access_token(audience=AUDIENCE, scope=SCOPE)
    assert "not-the-secret" not in str(info.value)


async def test_untrusted_endpoint(make: Any, context: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    other_ca = pki.create_ca("someone else")
    other = TrustAnchors(ca_pem=other_ca.cert_pem)
    context.backends["wrong"] = StaticCredentials(None, other, context=context)
    monkeypatch.setenv("OAUTH_SECRET", "x")
    backend = make(
        {
            "auth_method": "client_secret_basic",
            "client_secret": {"env": "OAUTH_SECRET"},
            "trust": "wrong",
        }
    )
    await backend.load()
    with pytest.raises(CredentialError, match=r"unreachable.*certificate"):
        await backend.access_token(audience=AUDIENCE, scope=SCOPE)


async def test_missing_trust_backend(make: Any) -> None:
    backend = make({"auth_method": "tls_client_auth", "identity": "northbound", "trust": "nope"})
    with pytest.raises(ConfigError, match=r"credentials\.nope"):
        await backend.load()


@pytest.mark.parametrize(
    ("options", "key", "problem"),
    [
        (
            {"token_url": "http://nrf/oauth2/token", "auth_method": "tls_client_auth"},
            "token_url",
            "https",
        ),
        (
            {"auth_method": "client_secret_basic", "client_secret": "inline!"},
            "client_secret",
            "inline",
        ),
        ({"auth_method": "client_secret_basic"}, "client_secret", "required"),
        ({"auth_method": "private_key_jwt"}, "signer", "exactly one"),
        ({"auth_method": "tls_client_auth"}, "identity", "required"),
        ({"auth_method": "tls_client_auth", "identity": "x", "scopes": "a"}, "scopes", "unknown"),
        ({"auth_method": "magic"}, "auth_method", "expected one of"),
    ],
)
def test_config_errors(make: Any, options: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        make(options)
    assert info.value.key == f"credentials.tokens.{key}"


async def test_a_redirect_is_not_followed(
    make: Any, endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8 finding 4: a 307 to http:// must not re-send the client secret in clear."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"access_token": "x", "token_type": "Bearer", "expires_in": 60})

    app = web.Application()
    app.router.add_post("/stolen", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        endpoint.redirect = f"http://127.0.0.1:{runner.addresses[0][1]}/stolen"
        monkeypatch.setenv("OAUTH_SECRET", "client-secret-value-42")
        backend = make(
            {"auth_method": "client_secret_basic", "client_secret": {"env": "OAUTH_SECRET"}}
        )
        await backend.load()
        with pytest.raises(CredentialError) as info:
            await backend.access_token(audience=AUDIENCE, scope=SCOPE)
    finally:
        await runner.cleanup()
    assert "HTTP 307" in str(info.value)
    assert seen == [], "the redirect was followed"
