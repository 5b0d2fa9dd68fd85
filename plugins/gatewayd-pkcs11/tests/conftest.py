"""A real SoftHSM2 token per test, on the test kit's plugin context."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from gatewayd_oauth2.backend import OAuth2Backend
from gatewayd_pkcs11.backend import DEFAULT_MODULE, Pkcs11Backend
from gatewayd_testing import MemoryPluginContext, StaticCredentials, plugin_settings
from pkcs11 import Attribute, KeyType
from pkcs11.util.ec import encode_named_curve_parameters

from gatewayd.api import TrustAnchors
from gatewayd.pki import create_ca

TOKEN = "gatewayd-test"
PIN = "4711-user"
SO_PIN = "0815-so"


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh token directory with one token holding an EC P-256 and an RSA key pair."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            TOKEN,
            "--pin",
            PIN,
            "--so-pin",
            SO_PIN,
        ],
        check=True,
        capture_output=True,
    )
    # SoftHSM reads SOFTHSM2_CONF in C_Initialize, once per process: re-initialise so
    # this test's token directory is the one the module sees.
    pkcs11.lib(DEFAULT_MODULE).reinitialize()
    token = pkcs11.lib(DEFAULT_MODULE).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN, rw=True) as session:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        params.generate_keypair(store=True, label="gw-ec")
        session.generate_keypair(KeyType.RSA, 2048, store=True, label="gw-rsa")
    return tmp_path


@pytest.fixture
def context() -> MemoryPluginContext:
    return MemoryPluginContext()


@pytest.fixture
async def make(
    softhsm: Path, context: MemoryPluginContext, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """Build a pkcs11 backend (PIN from $HSM_PIN unless given); all are closed afterwards."""
    monkeypatch.setenv("HSM_PIN", PIN)
    built: list[Pkcs11Backend] = []

    def _make(options: dict[str, Any] | None = None, name: str = "hsm") -> Pkcs11Backend:
        full: dict[str, Any] = {
            "token_label": TOKEN,
            "key_label": "gw-ec",
            "pin": {"env": "HSM_PIN"},
        }
        full.update(options or {})
        backend = Pkcs11Backend(plugin_settings(name, full, softhsm), context)
        context.backends[name] = backend
        built.append(backend)
        return backend

    yield _make
    for backend in built:
        await backend.aclose()


@pytest.fixture
async def make_oauth(
    softhsm: Path, context: MemoryPluginContext
) -> AsyncIterator[Callable[..., OAuth2Backend]]:
    """An oauth2 backend (with a trust backend beside it) in the same context as the HSM."""
    # Trust anchors only, as a ``[credentials.northbound]`` x509 table would give.
    trust = TrustAnchors(ca_pem=create_ca().cert_pem)
    context.backends["northbound"] = StaticCredentials(
        trust=trust, name="northbound", context=context
    )
    built: list[OAuth2Backend] = []

    def _make(options: dict[str, Any]) -> OAuth2Backend:
        backend = OAuth2Backend(
            plugin_settings("tokens", {"trust": "northbound", **options}, softhsm), context
        )
        built.append(backend)
        return backend

    yield _make
    for backend in built:
        await backend.aclose()
