"""The reference server as an OAuth 2.0 authorization server (TS 33.501 13.4.1), and as a
token-checking producer of MSGS_* (its side of Annex Y.5 with tokens).

``POST {apiRoot}/oauth2/token`` takes the client-credentials grant in both forms: plain
RFC 6749 (``client_id``, ``scope``, ``audience``/``resource``) and the TS 29.510
``AccessTokenReq`` (``nfInstanceId``, ``scope``, ``targetNfInstanceId``/``targetNfType``).
Clients authenticate by their mutual-TLS certificate (RFC 8705 ``tls_client_auth``), a
shared secret (``client_secret_basic``, configured by reference) or a signed assertion
(``private_key_jwt``, configured public keys). The endpoint sits on the mutual-TLS
listener, so every token is bound to the certificate the client presented
(``cnf.x5t#S256``): a stolen token is useless over another TLS connection.

Tokens and secrets are never logged; the log says who asked, how, and what was granted.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote_plus

import jwt
import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatewayd.api import TlsIdentity
from gatewayd.errors import TokenRejectedError
from gatewayd.msgin5g.registration import API_NAME
from gatewayd.options import SecretRef
from gatewayd.security.tls import PeerIdentity
from gatewayd.security.tokens import TokenGate, TokenIssuer, TokenPolicy, numeric_date

log = structlog.get_logger(__name__)

TOKEN_PATH: Final = "/oauth2/token"  # noqa: S105 - a URL path, not a secret
ACCESS_TOKEN_FILE: Final = "TS29510_Nnrf_AccessToken.yaml"  # noqa: S105 - a file name
JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# TS 29.510 AccessTokenReq.scope: space-separated service names.
_SCOPE = re.compile(r"^([a-zA-Z0-9_:-]+)( [a-zA-Z0-9_:-]+)*$")
DELIVERY_SCOPE: Final = "msgs-msgdelivery"
REGISTRATION_SCOPE: Final = API_NAME  # msgs-gwregistration
GATEWAY_SCOPES: Final = (DELIVERY_SCOPE, REGISTRATION_SCOPE)
# What the sim's own token says when it calls a gateway's MSGG API, by gateway type.
PUSH_SCOPES: Final = {"N3G": "msgg-n3gdelivery", "L3G": "msgg-l3gdelivery"}
MAX_ASSERTION_LIFETIME: Final = 300  # seconds; RFC 7523 assertions are meant to be short


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenClient:
    """A client that authenticates by secret or assertion (``[[tokens.clients]]``).

    Gateways on the allow-list need no entry for ``tls_client_auth``: their certificate
    is their credential.
    """

    client_id: str
    secret: SecretRef | None = None
    public_key_pem: bytes | None = field(default=None, repr=False)
    algorithm: str = "ES256"
    scopes: tuple[str, ...] = GATEWAY_SCOPES


@dataclass(frozen=True, slots=True, kw_only=True)
class SimTokens:
    """``[tokens]``: the sim's signing key and what it demands of MSGS callers.

    ``required``: every MSGS call needs a valid token (else a token, when sent, is still
    checked). ``audiences``: the names a token for us may carry in ``aud``; empty means
    the identities in our certificate (URI, DNS and IP SANs).
    """

    issuer: str
    key_pem: bytes = field(repr=False)
    algorithm: str = "ES256"
    key_id: str | None = None
    ttl: float = 300.0
    required: bool = True
    audiences: tuple[str, ...] = ()
    leeway: float = 30.0
    clients: tuple[TokenClient, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenGrant:
    """A token the sim issued: through its endpoint (``kind`` "endpoint") or for its
    own call to a gateway ("push"). The value is kept for tests (to prove it never
    reaches a log) and never shown."""

    kind: str
    client_id: str
    auth_method: str
    scope: str
    audience: str
    token_id: str
    token: str = field(repr=False)


class OAuthError(Exception):
    """An RFC 6749 5.2 error answer (``AccessTokenErr``); internal control flow."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class AuthorizationServer:
    """Issues tokens at the endpoint and for pushes; holds the gates MSGS calls pass."""

    def __init__(
        self,
        settings: SimTokens,
        identity: TlsIdentity,
        client_identity: TlsIdentity,
        is_gateway: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self.issuer = TokenIssuer(
            issuer=settings.issuer,
            key_pem=settings.key_pem,
            algorithm=settings.algorithm,
            key_id=settings.key_id,
            lifetime=settings.ttl,
        )
        # Tokens for us name our serving certificate's identities; our own tokens (for
        # calls to gateways) name, and are bound to, the client certificate we call with.
        names = _san_names(x509.load_pem_x509_certificate(identity.cert_chain_pem))
        self.audiences = settings.audiences or tuple(names)
        self._default_audience = names[0] if names else settings.issuer
        client = x509.load_pem_x509_certificate(client_identity.cert_chain_pem)
        self._own_cert_der = client.public_bytes(serialization.Encoding.DER)
        client_names = _san_names(client)
        self.subject = client_names[0] if client_names else settings.issuer
        self._is_gateway = is_gateway  # on the allow-list: tls_client_auth needs no entry
        self._clients = {c.client_id: c for c in settings.clients}
        self.token_url = ""  # set once the listener has a port: assertions name it
        self.requests = 0
        self.grants: list[TokenGrant] = []
        self._seen_assertions: dict[str, float] = {}
        self._push_cache: dict[tuple[str, str], tuple[str, float]] = {}
        self.gates = {
            scope: TokenGate(
                policy=TokenPolicy(
                    issuer=settings.issuer,
                    audience=self.audiences,
                    verification_key_pem=self.issuer.public_key_pem,
                    algorithms=(settings.algorithm,),
                    required_scope=scope,
                    leeway=settings.leeway,
                    # Every token we issue is bound; an unbound one is not ours.
                    require_cnf=True,
                ),
                required=settings.required,
            )
            for scope in GATEWAY_SCOPES
        }

    # --- the token endpoint --------------------------------------------------------------

    async def handle(
        self,
        request: web.Request,
        peer: PeerIdentity | None,
        check: Callable[[str, str, object], None] | None = None,
    ) -> web.Response:
        """``POST /oauth2/token``: a token, or an ``AccessTokenErr`` answer.

        ``check(api_file, schema, body)`` vets each answer before it is sent.
        """
        self.requests += 1
        method = "unknown"
        claimed: str | None = None
        try:
            if request.content_type != "application/x-www-form-urlencoded":
                raise OAuthError(
                    400, "invalid_request", "expected application/x-www-form-urlencoded"
                )
            posted = await request.post()
            form = {k: v for k, v in posted.items() if isinstance(v, str)}
            if form.get("grant_type") != "client_credentials":
                raise OAuthError(400, "unsupported_grant_type", "only client_credentials")
            claimed = form.get("nfInstanceId") or form.get("client_id")
            method, client_id = self._authenticate(request, form, peer)
            granted = self._scope(form.get("scope", ""), client_id)
            audience = self._audience(form)
        except OAuthError as exc:
            log.warning(
                "sim.token.refused",
                peer=peer.primary if peer else None,
                client_id=claimed,
                auth_method=method,
                error=exc.error,
            )
            headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
            if exc.error == "invalid_client" and request.headers.get("Authorization"):
                headers["WWW-Authenticate"] = 'Basic realm="oauth2"'
            error = {"error": exc.error, "error_description": exc.description}
            if check is not None:
                check(ACCESS_TOKEN_FILE, "AccessTokenErr", error)
            return web.json_response(error, status=exc.status, headers=headers)
        cert_der = _peer_cert_der(request)
        token = self.issuer.issue(
            subject=client_id, audience=audience, scope=granted, client_cert_der=cert_der
        )
        self._record("endpoint", client_id, method, granted, audience=audience, token=token)
        log.info(
            "sim.token.issued",
            client_id=client_id,
            auth_method=method,
            scope=granted,
            audience=audience,
            expires_in=int(self.settings.ttl),
        )
        body = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self.settings.ttl),
            "scope": granted,
        }
        if check is not None:
            check(ACCESS_TOKEN_FILE, "AccessTokenRsp", body)
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate(
        self, request: web.Request, form: dict[str, str], peer: PeerIdentity | None
    ) -> tuple[str, str]:
        """(auth method, authenticated client id), or :class:`OAuthError`."""
        claimed = form.get("nfInstanceId") or form.get("client_id")
        authorization = request.headers.get("Authorization", "")
        if authorization.lower().startswith("basic "):
            client_id = self._basic(authorization[6:].strip())
            method = "client_secret_basic"
        elif "client_assertion" in form:
            client_id = self._assertion(form)
            method = "private_key_jwt"
        else:
            # RFC 8705 2.1: the certificate of this very connection is the credential.
            if not claimed or peer is None or not peer.matches(claimed):
                raise OAuthError(401, "invalid_client", "client certificate does not match")
            if not (self._is_gateway(claimed) or claimed in self._clients):
                raise OAuthError(401, "invalid_client", "unknown client")
            return "tls_client_auth", claimed
        if claimed and claimed != client_id:
            raise OAuthError(400, "invalid_request", "client id differs from the credential")
        return method, client_id

    def _basic(self, encoded: str) -> str:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthError(401, "invalid_client", "malformed Basic credentials") from None
        client = self._clients.get(unquote_plus(user))
        if not sep or client is None or client.secret is None:
            raise OAuthError(401, "invalid_client", "client authentication failed")
        expected = client.secret.read_text().encode()
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(unquote_plus(password).encode(), expected):
            raise OAuthError(401, "invalid_client", "client authentication failed")
        return client.client_id

    def _assertion(self, form: dict[str, str]) -> str:
        if form.get("client_assertion_type") != JWT_BEARER:
            raise OAuthError(400, "invalid_request", "unsupported client_assertion_type")
        assertion = form["client_assertion"]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise OAuthError(401, "invalid_client", "malformed client assertion") from None
        client = self._clients.get(str(unverified.get("iss", "")))
        if client is None or client.public_key_pem is None:
            raise OAuthError(401, "invalid_client", "client authentication failed")
        try:
            # The client's algorithm and key are pinned by configuration, never the header.
            claims = jwt.decode(
                assertion,
                client.public_key_pem,
                algorithms=[client.algorithm],
                audience=self.token_url,
                issuer=client.client_id,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
            # PyJWT lets "1234" through as exp (it checks int(exp)): a JSON number only.
            expires = numeric_date(claims["exp"], "exp").timestamp()
        except (jwt.InvalidTokenError, TokenRejectedError, TypeError, ValueError, OverflowError):
            raise OAuthError(401, "invalid_client", "client authentication failed") from None
        now = time.time()
        self._seen_assertions = {j: e for j, e in self._seen_assertions.items() if e > now}
        jti = str(claims["jti"])
        if (
            claims["sub"] != client.client_id
            or expires - now > MAX_ASSERTION_LIFETIME
            or jti in self._seen_assertions
        ):
            # A replayed or over-long assertion is as good as a stolen one.
            raise OAuthError(401, "invalid_client", "client authentication failed")
        self._seen_assertions[jti] = expires
        return client.client_id

    def _scope(self, requested: str, client_id: str) -> str:
        if not _SCOPE.match(requested):
            raise OAuthError(400, "invalid_scope", "scope is missing or malformed")
        client = self._clients.get(client_id)
        allowed = set(client.scopes if client else GATEWAY_SCOPES)
        if not set(requested.split()) <= allowed:
            raise OAuthError(400, "invalid_scope", "a requested scope is not granted to you")
        return requested

    def _audience(self, form: dict[str, str]) -> str:
        requested = (
            form.get("targetNfInstanceId")
            or form.get("targetNfType")
            or form.get("audience")
            or form.get("resource")
        )
        if requested is None:
            return self._default_audience
        if requested not in self.audiences:
            # invalid_target (RFC 8707) is not in the 3GPP enumeration; invalid_request is.
            raise OAuthError(400, "invalid_request", "the requested audience is not this server")
        return requested

    # --- the sim's own tokens, for its calls to gateways ---------------------------------

    def push_token(self, gw_id: str, gw_type: str) -> str:
        """A token naming the gateway as audience and its MSGG API as scope, bound to our
        own client certificate; reused until half its lifetime has passed."""
        scope = PUSH_SCOPES.get(gw_type, PUSH_SCOPES["N3G"])
        cached = self._push_cache.get((gw_id, scope))
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        token = self.issuer.issue(
            subject=self.subject, audience=gw_id, scope=scope, client_cert_der=self._own_cert_der
        )
        self._push_cache[(gw_id, scope)] = (token, time.monotonic() + self.settings.ttl / 2)
        self._record("push", self.subject, "self", scope, audience=gw_id, token=token)
        log.info(
            "sim.token.issued",
            client_id=self.subject,
            auth_method="self",
            scope=scope,
            audience=gw_id,
            expires_in=int(self.settings.ttl),
        )
        return token

    def _record(
        self, kind: str, client_id: str, method: str, scope: str, *, audience: str, token: str
    ) -> None:
        jti = jwt.decode(token, options={"verify_signature": False}).get("jti", "")
        self.grants.append(
            TokenGrant(
                kind=kind,
                client_id=client_id,
                auth_method=method,
                scope=scope,
                audience=audience,
                token_id=str(jti),
                token=token,
            )
        )

    # --- checking MSGS calls -------------------------------------------------------------

    def check(self, request: web.Request, scope: str, peer: PeerIdentity | None) -> None:
        """Verify an MSGS call's token for ``scope``; :class:`TokenRejectedError` if bad."""
        self.gates[scope].check(
            request.headers.get("Authorization"),
            peer_cert_der=_peer_cert_der(request),
            peer=peer,
        )

    def challenge(self, scope: str, refusal: TokenRejectedError) -> tuple[int, str]:
        return self.gates[scope].challenge(refusal)


def _peer_cert_der(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    der: bytes | None = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return der


def _san_names(cert: x509.Certificate) -> list[str]:
    """Our names as a token audience: URI SANs first (instance ids), then DNS, then IPs."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.UniformResourceIdentifier),
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    ]
