"""A real HTTPS token endpoint (aiohttp, TLS, TokenIssuer), on the test kit's plugin context."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from gatewayd_oauth2.backend import OAuth2Backend
from gatewayd_testing import MemoryPluginContext, StaticCredentials, plugin_settings

from gatewayd import pki
from gatewayd.api import TlsIdentity, TrustAnchors
from gatewayd.security import tls
from gatewayd.security.tokens import TokenIssuer

CLIENT_ID = "urn:gatewayd:gateway:demo-n3g"
CLIENT_SECRET = "client-secret-value-42"


@dataclass
class TokenEndpoint:
    """The authorization server side, with knobs and a record of what it received."""

    issuer: TokenIssuer
    url: str = ""
    lifetime: int = 300
    delay: float = 0.0
    fail: tuple[int, dict[str, Any]] | None = None
    redirect: str | None = None  # answer 307 to this Location
    assertion_keys: dict[str, bytes] = field(default_factory=dict)
    requests: int = 0
    forms: list[dict[str, str]] = field(default_factory=list)
    seen_jti: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.forms.append(form)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.redirect is not None:
            return web.Response(status=307, headers={"Location": self.redirect})
        if self.fail is not None:
            status, body = self.fail
            return web.json_response(body, status=status)
        client_id, cert_der = self._authenticate(request, form)
        if client_id is None:
            return web.json_response({"error": "invalid_client"}, status=401)
        audience = form.get("audience") or form.get("targetNfType") or "unknown"
        token = self.issuer.issue(
            subject=client_id,
            audience=audience,
            scope=form["scope"],
            lifetime=self.lifetime,
            client_cert_der=cert_der,
        )
        body = {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime}
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate(
        self, request: web.Request, form: dict[str, str]
    ) -> tuple[str | None, bytes | None]:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            ok = unquote_plus(password) == CLIENT_SECRET
            return (unquote_plus(user) if ok else None), None
        if "client_assertion" in form:
            assertion = form["client_assertion"]
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            key = self.assertion_keys.get(unverified.get("iss", ""))
            if key is None:
                return None, None
            claims = jwt.decode(
                assertion,
                key,
                algorithms=["ES256", "RS256"],
                audience=self.url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
            fresh = claims["jti"] not in self.seen_jti and claims["exp"] - claims["iat"] <= 300
            self.seen_jti.add(claims["jti"])
            ok = fresh and claims["sub"] == claims["iss"]
            return (claims["iss"] if ok else None), None
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if der is None:
            return None, None
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        client = form.get("client_id") or form.get("nfInstanceId")
        # RFC 8705 2.1.2: the certificate's SAN must be the registered client's.
        return (client if client in uris else None), der


@dataclass
class Pki:
    ca: pki.Issued
    server: pki.Issued
    client: pki.Issued

    @property
    def trust(self) -> TrustAnchors:
        return TrustAnchors(ca_pem=self.ca.cert_pem)

    @property
    def client_identity(self) -> TlsIdentity:
        return TlsIdentity(cert_chain_pem=self.client.cert_pem, key_pem=self.client.key_pem)

    @property
    def client_der(self) -> bytes:
        return self.client.cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="session")
def certs() -> Pki:
    ca = pki.create_ca("oauth2 test CA")
    return Pki(
        ca=ca,
        server=pki.issue(ca, "nrf", dns=("localhost",), ips=("127.0.0.1",)),
        client=pki.issue(ca, "gateway", uris=(CLIENT_ID,)),
    )


@pytest.fixture
async def endpoint(certs: Pki) -> AsyncIterator[TokenEndpoint]:
    issuer = TokenIssuer(
        issuer="https://nrf.test",
        key_pem=pki.new_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    server = TokenEndpoint(issuer=issuer)
    app = web.Application()
    app.router.add_post("/oauth2/token", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    identity = TlsIdentity(cert_chain_pem=certs.server.cert_pem, key_pem=certs.server.key_pem)
    ctx = tls.server_context(identity, certs.trust, require_client_cert=False)
    # Client certificates are optional here: only tls_client_auth presents one.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"https://localhost:{port}/oauth2/token"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
def context(certs: Pki) -> MemoryPluginContext:
    ctx = MemoryPluginContext()
    ctx.backends["northbound"] = StaticCredentials(certs.client_identity, certs.trust, context=ctx)
    ctx.backends["trust-only"] = StaticCredentials(None, certs.trust, context=ctx)
    return ctx


Make = Callable[..., Any]


@pytest.fixture
async def make(
    tmp_path: Path, context: MemoryPluginContext, endpoint: TokenEndpoint
) -> AsyncIterator[Callable[..., Any]]:
    """Build (not load) an oauth2 backend; every backend built is closed afterwards."""
    built: list[OAuth2Backend] = []

    def _make(options: dict[str, Any], name: str = "tokens") -> OAuth2Backend:
        full = {"token_url": endpoint.url, "client_id": CLIENT_ID, "trust": "trust-only"}
        full.update(options)
        backend = OAuth2Backend(plugin_settings(name, full, tmp_path), context)
        context.backends[name] = backend
        built.append(backend)
        return backend

    yield _make
    for backend in built:
        await backend.aclose()
