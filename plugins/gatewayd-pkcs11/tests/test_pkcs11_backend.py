"""The pkcs11 backend against a real SoftHSM2 token."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from gatewayd_pkcs11.backend import Pkcs11Backend
from structlog.testing import capture_logs

from gatewayd.api import ConfigError, CredentialError
from gatewayd.plugins import Plugins

CLIENT_ID = "urn:gatewayd:gateway:demo-n3g"
TOKEN_URL = "https://nrf.example:8443/oauth2/token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_plugin_registers_backend() -> None:
    assert Plugins(autoload=True).credential_backends.get("pkcs11") is Pkcs11Backend


async def test_private_key_jwt_signed_in_hsm(make: Any, make_oauth: Any) -> None:
    hsm = make({"key_id": "hsm-1"})
    with capture_logs() as logs:
        await hsm.load()
    assert logs[0]["event"] == "pkcs11.key_found"
    assert "4711-user" not in repr(logs)
    oauth = make_oauth(
        {
            "token_url": TOKEN_URL,
            "client_id": CLIENT_ID,
            "auth_method": "private_key_jwt",
            "signer": "hsm",
        }
    )
    await oauth.load()
    assertion = await oauth.client_assertion()
    assert jwt.get_unverified_header(assertion) == {"alg": "ES256", "typ": "JWT", "kid": "hsm-1"}
    claims = jwt.decode(assertion, hsm.public_key_pem, algorithms=["ES256"], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["exp"] > claims["iat"]
    assert claims["jti"]


async def test_es256_signature_is_raw_r_s(make: Any) -> None:
    hsm = make()
    await hsm.load()
    signer = hsm.signer()
    assert signer.algorithm == "ES256"
    # Concurrent callers share one session: the lock serialises them in the threads.
    messages = [f"message {i}".encode() for i in range(16)]
    signatures = await asyncio.gather(*(signer.sign(m) for m in messages))
    public = serialization.load_pem_public_key(hsm.public_key_pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for message, signature in zip(messages, signatures, strict=True):
        assert len(signature) == 64
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        public.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))


async def test_rs256_jws_verifies_with_pyjwt(make: Any) -> None:
    hsm = make({"key_label": "gw-rsa", "algorithm": "RS256"})
    await hsm.load()
    signer = hsm.signer()
    header = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps({"sub": "x", "n": 1}).encode())
    signature = await signer.sign(f"{header}.{payload}".encode())
    token = f"{header}.{payload}.{_b64(signature)}"
    assert jwt.decode(token, hsm.public_key_pem, algorithms=["RS256"]) == {"sub": "x", "n": 1}


async def test_reload_keeps_working(make: Any) -> None:
    hsm = make()
    await hsm.load()
    pem = hsm.public_key_pem
    await hsm.load()  # SIGHUP: re-checks the session instead of logging in twice
    assert hsm.public_key_pem == pem
    assert len(await hsm.signer().sign(hashlib.sha256(b"x").digest())) == 64


async def test_wrong_pin(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    hsm = make()
    monkeypatch.setenv("HSM_PIN", "9999-wrong")
    with pytest.raises(CredentialError) as info:
        await hsm.load()
    message = str(info.value)
    assert "PIN was refused" in message
    assert "gatewayd-test" in message
    assert "9999-wrong" not in message
    assert "4711-user" not in message


async def test_unknown_token_and_key(make: Any) -> None:
    with pytest.raises(CredentialError, match="no PKCS#11 token labelled 'nope'"):
        await make({"token_label": "nope"}).load()
    with pytest.raises(CredentialError, match=r"'missing'.*no private EC key"):
        await make({"key_label": "missing"}, name="k").load()
    # An RSA key where ES256 was configured is not silently used.
    with pytest.raises(CredentialError, match="no private EC key"):
        await make({"key_label": "gw-rsa"}, name="k2").load()


def test_inline_pin_refused(make: Any) -> None:
    with pytest.raises(ConfigError, match=r"credentials\.hsm\.pin: inline secrets"):
        make({"pin": "4711-user"})


def test_unknown_option_refused(make: Any) -> None:
    with pytest.raises(ConfigError, match=r"credentials\.hsm\.slot: unknown key"):
        make({"slot": 0})
