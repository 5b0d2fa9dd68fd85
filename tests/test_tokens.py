"""Access-token verification: the good case and every reason a token is refused."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from gatewayd import pki
from gatewayd.errors import ConfigError
from gatewayd.security.tokens import (
    Claims,
    TokenIssuer,
    TokenPolicy,
    TokenRejectedError,
    cert_thumbprint,
    verify_token,
)

ISSUER = "https://nrf.example/oauth2"
AUDIENCE = "MSGS"  # 3GPP uses the producer's NF type (or instance ids) as aud
CONSUMER = "urn:gatewayd:gateway:demo-n3g"
SCOPE = "msgs-msgdelivery msgs-asregistration"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{_b64(signature)}"


def _key_pem(key: pki.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def signing_key() -> pki.PrivateKey:
    return pki.new_key("ec")


@pytest.fixture(scope="module")
def issuer(signing_key: pki.PrivateKey) -> TokenIssuer:
    return TokenIssuer(issuer=ISSUER, key_pem=_key_pem(signing_key), key_id="k1")


@pytest.fixture(scope="module")
def client_cert() -> bytes:
    ca = pki.create_ca()
    return pki.issue(ca, "gw").cert.public_bytes(serialization.Encoding.DER)


def _claims(issuer: TokenIssuer, **overrides: Any) -> dict[str, Any]:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    base: dict[str, Any] = {
        "iss": issuer.issuer,
        "sub": CONSUMER,
        "aud": AUDIENCE,
        "scope": SCOPE,
        "iat": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def _reject(token: str, policy: TokenPolicy, peer: bytes | None = None) -> TokenRejectedError:
    with pytest.raises(TokenRejectedError) as info:
        verify_token(token, policy, peer_cert_der=peer)
    # The token is a secret: it must never appear in what gets logged or answered.
    assert token not in str(info.value)
    return info.value


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_good_token(algorithm: str, client_cert: bytes) -> None:
    key = pki.new_key("rsa" if algorithm == "RS256" else "ec")
    signer = TokenIssuer(issuer=ISSUER, key_pem=_key_pem(key), algorithm=algorithm)
    token = signer.issue(
        subject=CONSUMER, audience=AUDIENCE, scope=SCOPE, client_cert_der=client_cert
    )
    policy = signer.policy(audience=AUDIENCE, required_scope="msgs-msgdelivery", require_cnf=True)
    claims = verify_token(token, policy, peer_cert_der=client_cert)
    assert isinstance(claims, Claims)
    assert claims.subject == CONSUMER
    assert claims.issuer == ISSUER
    assert claims.audience == (AUDIENCE,)
    assert claims.scopes == frozenset(SCOPE.split())
    assert claims.cert_thumbprint == cert_thumbprint(client_cert)
    assert claims.token_id
    assert claims.expires_at > dt.datetime.now(dt.UTC)
    assert jwt.get_unverified_header(token)["alg"] == algorithm


def test_thumbprint_is_rfc8705_form(client_cert: bytes) -> None:
    expected = base64.urlsafe_b64encode(hashlib.sha256(client_cert).digest()).rstrip(b"=")
    assert cert_thumbprint(client_cert) == expected.decode()
    assert "=" not in cert_thumbprint(client_cert)


def test_alg_none(issuer: TokenIssuer) -> None:
    token = _forge({"alg": "none", "typ": "JWT"}, _claims(issuer))
    assert _reject(token, issuer.policy(audience=AUDIENCE)).reason == "alg_not_allowed"


def test_hs256_key_confusion(issuer: TokenIssuer) -> None:
    # The attacker knows the public key and uses it as an HMAC secret.
    secret = issuer.public_key_pem

    def sign(data: bytes) -> bytes:
        return hmac.new(secret, data, hashlib.sha256).digest()

    token = _forge({"alg": "HS256", "typ": "JWT"}, _claims(issuer), sign)
    assert _reject(token, issuer.policy(audience=AUDIENCE)).reason == "alg_not_allowed"


def test_policy_refuses_symmetric_or_mismatched_algorithms(issuer: TokenIssuer) -> None:
    with pytest.raises(ConfigError, match="'HS256' is not allowed"):
        TokenPolicy(
            issuer=ISSUER,
            audience=AUDIENCE,
            verification_key_pem=issuer.public_key_pem,
            algorithms=("ES256", "HS256"),
        )
    with pytest.raises(ConfigError, match="RS256 does not fit"):
        TokenPolicy(
            issuer=ISSUER,
            audience=AUDIENCE,
            verification_key_pem=issuer.public_key_pem,
            algorithms=("RS256",),
        )


def test_expired_and_leeway(issuer: TokenIssuer) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=310)
    token = issuer.issue(subject=CONSUMER, audience=AUDIENCE, scope=SCOPE, now=past)  # exp -10s
    assert _reject(token, issuer.policy(audience=AUDIENCE, leeway=0)).reason == "expired"
    claims = verify_token(token, issuer.policy(audience=AUDIENCE, leeway=30), peer_cert_der=None)
    assert claims.subject == CONSUMER


def test_not_yet_valid(issuer: TokenIssuer) -> None:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    token = issuer.issue(subject=CONSUMER, audience=AUDIENCE, scope=SCOPE, extra={"nbf": now + 600})
    assert _reject(token, issuer.policy(audience=AUDIENCE)).reason == "not_yet_valid"


def test_bad_audience(issuer: TokenIssuer) -> None:
    token = issuer.issue(subject=CONSUMER, audience="NRF", scope=SCOPE)
    assert _reject(token, issuer.policy(audience=AUDIENCE)).reason == "bad_audience"


def test_audience_list_is_accepted(issuer: TokenIssuer) -> None:
    token = issuer.issue(subject=CONSUMER, audience=["NRF", AUDIENCE], scope=SCOPE)
    claims = verify_token(token, issuer.policy(audience=AUDIENCE), peer_cert_der=None)
    assert claims.audience == ("NRF", AUDIENCE)


def test_bad_issuer(issuer: TokenIssuer) -> None:
    token = issuer.issue(subject=CONSUMER, audience=AUDIENCE, scope=SCOPE)
    policy = TokenPolicy(
        issuer="https://other.example",
        audience=AUDIENCE,
        verification_key_pem=issuer.public_key_pem,
    )
    assert _reject(token, policy).reason == "bad_issuer"


def test_bad_signature(issuer: TokenIssuer) -> None:
    impostor = TokenIssuer(issuer=ISSUER, key_pem=_key_pem(pki.new_key()))
    token = impostor.issue(subject=CONSUMER, audience=AUDIENCE, scope=SCOPE)
    assert _reject(token, issuer.policy(audience=AUDIENCE)).reason == "bad_signature"
    # A tampered payload under a genuine signature fails the same way.
    genuine = issuer.issue(subject=CONSUMER, audience=AUDIENCE, scope="msgs-msgdelivery")
    head, _, sig = genuine.split(".")
    forged = f"{head}.{_b64(json.dumps(_claims(issuer, scope='admin')).encode())}.{sig}"
    assert _reject(forged, issuer.policy(audience=AUDIENCE)).reason == "bad_signature"


def test_missing_scope(issuer: TokenIssuer) -> None:
    token = issuer.issue(subject=CONSUMER, audience=AUDIENCE, scope="msgs-asregistration")
    policy = issuer.policy(audience=AUDIENCE, required_scope="msgs-msgdelivery")
    error = _reject(token, policy)
    assert error.reason == "missing_scope"
    assert "msgs-msgdelivery" in error.detail


def test_cnf_mismatch(issuer: TokenIssuer, client_cert: bytes) -> None:
    other = pki.issue(pki.create_ca(), "other").cert.public_bytes(serialization.Encoding.DER)
    bound = issuer.issue(
        subject=CONSUMER, audience=AUDIENCE, scope=SCOPE, client_cert_der=client_cert
    )
    policy = issuer.policy(audience=AUDIENCE)
    # Bound to another certificate: a stolen token replayed from another client.
    assert _reject(bound, policy, other).reason == "cnf_mismatch"
    # Bound, but no client certificate at all on this connection.
    assert _reject(bound, policy, None).reason == "cnf_mismatch"
    # Unbound, while the policy demands binding.
    unbound = issuer.issue(subject=CONSUMER, audience=AUDIENCE, scope=SCOPE)
    strict = issuer.policy(audience=AUDIENCE, require_cnf=True)
    assert _reject(unbound, strict, client_cert).reason == "cnf_mismatch"
    # A cnf in a form we cannot check is not silently ignored.
    odd = issuer.issue(
        subject=CONSUMER, audience=AUDIENCE, scope=SCOPE, extra={"cnf": {"jkt": "abc"}}
    )
    assert _reject(odd, policy, client_cert).reason == "cnf_mismatch"


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.e30"])
def test_malformed(issuer: TokenIssuer, token: str) -> None:
    with pytest.raises(TokenRejectedError) as info:
        verify_token(token, issuer.policy(audience=AUDIENCE), peer_cert_der=None)
    assert info.value.reason == "malformed"


def test_missing_subject_is_malformed(issuer: TokenIssuer, signing_key: pki.PrivateKey) -> None:
    token = jwt.encode(_claims(issuer, sub=None), signing_key, algorithm="ES256")
    assert _reject(token, issuer.policy(audience=AUDIENCE)).reason == "malformed"
