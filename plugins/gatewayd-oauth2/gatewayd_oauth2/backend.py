"""The ``oauth2`` credential backend: client-credentials access tokens (RFC 6749 4.4).

Tokens are fetched from the configured token endpoint over verified TLS, cached per
(audience, scope) and refreshed ``refresh_margin`` seconds before they expire. Any
number of concurrent callers that find no fresh token share one request (single
flight). The token, the client secret and the client assertion are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote_plus, urlsplit

import aiohttp

from gatewayd.api import (
    ConfigError,
    CredentialBackend,
    CredentialError,
    PluginContext,
    PluginSettings,
    SecretRef,
    Signer,
    TlsIdentity,
    TrustAnchors,
    client_context,
)
from gatewayd_oauth2.signing import LocalKeySigner, sign_jwt

AUTH_METHODS: Final = ("client_secret_basic", "private_key_jwt", "tls_client_auth")
REQUEST_FORMATS: Final = ("rfc6749", "3gpp")
JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True, slots=True)
class _Token:
    value: str = field(repr=False)
    expires_at: float  # time.monotonic() seconds
    refresh_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuth2Settings:
    """The backend's options, read and cross-checked once at construction."""

    token_url: str
    client_id: str
    auth_method: str
    request_format: str
    trust: str
    identity: str | None
    client_secret: SecretRef | None
    signer: str | None
    signing_key: Path | None
    signing_key_passphrase: SecretRef | None
    signing_algorithm: str
    key_id: str | None
    nf_type: str | None
    audience_field: str
    audience_param: str
    refresh_margin: float
    assertion_lifetime: float
    timeout: float


def read_settings(settings: PluginSettings) -> OAuth2Settings:
    options = settings.options
    token_url = options.get_str("token_url")
    if urlsplit(token_url).scheme != "https":
        # TS 33.501 13.4.1: tokens only over TLS.
        raise options.error("token_url", "must be an https:// URL")
    auth_method = options.get_choice("auth_method", AUTH_METHODS)
    signer = options.get_str("signer", None)
    signing_key = options.get_path("signing_key", None, base=settings.base_dir)
    out = OAuth2Settings(
        token_url=token_url,
        client_id=options.get_str("client_id"),
        auth_method=auth_method,
        request_format=options.get_choice("request_format", REQUEST_FORMATS, "rfc6749"),
        trust=options.get_str("trust"),
        identity=options.get_str("identity", None),
        client_secret=options.secret("client_secret", required=False),
        signer=signer,
        signing_key=signing_key,
        signing_key_passphrase=options.secret("signing_key_passphrase", required=False),
        signing_algorithm=options.get_choice("signing_algorithm", ("ES256", "RS256"), "ES256"),
        key_id=options.get_str("key_id", None),
        nf_type=options.get_str("nf_type", None),
        audience_field=options.get_choice(
            "audience_field", ("targetNfType", "targetNfInstanceId"), "targetNfType"
        ),
        audience_param=options.get_choice(
            "audience_param", ("audience", "resource", "none"), "audience"
        ),
        refresh_margin=options.get_float("refresh_margin", 60.0),
        assertion_lifetime=options.get_float("assertion_lifetime", 60.0, minimum=1.0),
        timeout=options.get_float("timeout", 10.0, minimum=0.1),
    )
    options.check_unknown()
    if auth_method == "client_secret_basic" and out.client_secret is None:
        raise options.error("client_secret", "is required with auth_method client_secret_basic")
    if auth_method != "client_secret_basic" and out.client_secret is not None:
        raise options.error("client_secret", f"is not used with auth_method {auth_method}")
    if auth_method == "private_key_jwt" and (signer is None) == (signing_key is None):
        raise options.error("signer", "private_key_jwt needs exactly one of signer or signing_key")
    if auth_method != "private_key_jwt" and (signer or signing_key):
        raise options.error(
            "signer" if signer else "signing_key", f"is not used with auth_method {auth_method}"
        )
    if auth_method == "tls_client_auth" and out.identity is None:
        raise options.error("identity", "is required with auth_method tls_client_auth")
    return out


class OAuth2Backend(CredentialBackend):
    """Bearer tokens from an OAuth 2.0 authorization server (``plugin = "oauth2"``)."""

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        super().__init__(settings, context)
        self._cfg = read_settings(settings)
        self._local_signer: LocalKeySigner | None = None
        self._cache: dict[tuple[str, str], _Token] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[_Token]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._session_material: tuple[TrustAnchors, TlsIdentity | None] | None = None

    async def load(self) -> None:
        """Check the referenced backends exist and (re)read a local signing key.

        Cached tokens stay valid: they do not depend on files that may have changed.
        """
        cfg = self._cfg
        for name in (cfg.trust, cfg.identity, cfg.signer):
            if name is not None:
                self.context.credentials(name)  # ConfigError names the missing table
        if cfg.signing_key is not None:
            passphrase = cfg.signing_key_passphrase
            self._local_signer = await asyncio.to_thread(
                LocalKeySigner,
                cfg.signing_key,
                passphrase=passphrase.read_text().encode() if passphrase else None,
                algorithm=cfg.signing_algorithm,
                key_id=cfg.key_id,
            )

    def watched_paths(self) -> tuple[Path, ...]:
        return (self._cfg.signing_key,) if self._cfg.signing_key is not None else ()

    async def access_token(self, *, audience: str, scope: str) -> str | None:
        """A valid token for ``audience`` and ``scope``, from cache or freshly fetched."""
        key = (audience, scope)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() < cached.refresh_at:
            return cached.value
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(
                self._fetch(audience, scope), name=f"oauth2:{self.settings.name}:fetch"
            )
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._fetched(key, done))
        # shield: one caller giving up must not cancel the request the others wait on.
        token = await asyncio.shield(task)
        return token.value

    def _fetched(self, key: tuple[str, str], task: asyncio.Task[_Token]) -> None:
        self._inflight.pop(key, None)
        if task.cancelled():
            return
        if task.exception() is None:  # also marks a failure as retrieved
            self._cache[key] = task.result()

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._inflight.clear()
        self._cache.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- one token request -------------------------------------------------------------

    async def _fetch(self, audience: str, scope: str) -> _Token:
        cfg = self._cfg
        form, headers = await self._request(audience, scope)
        session = await self._http()
        started = time.monotonic()
        try:
            # Never follow a redirect: it would carry the client's credentials (a
            # secret, an assertion) to another host, or into cleartext.
            async with session.post(
                cfg.token_url, data=form, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                body: Any = await _json(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.context.log.warning(
                "oauth2.token.failed",
                credentials=self.settings.name,
                audience=audience,
                scope=scope,
                error=type(exc).__name__,
            )
            raise CredentialError(
                f"token endpoint {cfg.token_url} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        if status != 200:
            raise self._refused(status, body, audience, scope)
        token, expires_in = _parse_token(body, cfg.token_url)
        # Refresh early, but never more than half-way through a short-lived token.
        margin = min(cfg.refresh_margin, expires_in / 2)
        self.context.log.info(
            "oauth2.token.refreshed",
            credentials=self.settings.name,
            audience=audience,
            scope=scope,
            expires_in=expires_in,
        )
        return _Token(token, started + expires_in, started + expires_in - margin)

    def _refused(self, status: int, body: Any, audience: str, scope: str) -> CredentialError:
        error = body.get("error") if isinstance(body, dict) else None
        cause = body.get("cause") if isinstance(body, dict) else None  # ProblemDetails
        code = error if isinstance(error, str) else cause if isinstance(cause, str) else None
        description = body.get("error_description") if isinstance(body, dict) else None
        self.context.log.warning(
            "oauth2.token.refused",
            credentials=self.settings.name,
            audience=audience,
            scope=scope,
            status=status,
            error=code,
        )
        detail = f": {description}" if isinstance(description, str) else ""
        return CredentialError(
            f"token endpoint {self._cfg.token_url} refused the request "
            f"(HTTP {status}, error {code or 'unknown'}){detail}"
        )

    async def _request(self, audience: str, scope: str) -> tuple[dict[str, str], dict[str, str]]:
        cfg = self._cfg
        headers = {"Accept": "application/json"}
        if cfg.request_format == "3gpp":
            # TS 29.510 AccessTokenReq, form-encoded.
            form = {"grant_type": "client_credentials", "nfInstanceId": cfg.client_id}
            if cfg.nf_type:
                form["nfType"] = cfg.nf_type
            form[cfg.audience_field] = audience
            form["scope"] = scope
        else:
            form = {"grant_type": "client_credentials", "scope": scope}
            if cfg.audience_param != "none":
                form[cfg.audience_param] = audience
            if cfg.auth_method != "client_secret_basic":
                # RFC 8705 2.1 requires it with tls_client_auth; harmless with a JWT.
                form["client_id"] = cfg.client_id
        if cfg.auth_method == "client_secret_basic":
            assert cfg.client_secret is not None  # checked in read_settings
            secret = cfg.client_secret.read_text()  # read per request: rotation just works
            # RFC 6749 2.3.1: both parts form-encoded before base64.
            pair = f"{quote_plus(cfg.client_id)}:{quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif cfg.auth_method == "private_key_jwt":
            form["client_assertion_type"] = JWT_BEARER
            form["client_assertion"] = await self.client_assertion()
        return form, headers

    async def client_assertion(self) -> str:
        """A fresh RFC 7523 client assertion: a short-lived, single-use JWT signed by
        the configured signer (``iss`` = ``sub`` = client_id, ``aud`` = token_url)."""
        cfg = self._cfg
        now = int(time.time())
        claims = {
            "iss": cfg.client_id,
            "sub": cfg.client_id,
            "aud": cfg.token_url,
            "iat": now,
            "exp": now + int(cfg.assertion_lifetime),
            "jti": str(uuid.uuid4()),
        }
        return await sign_jwt(self._signer(), claims)

    def _signer(self) -> Signer:
        cfg = self._cfg
        if cfg.signer is not None:
            signer = self.context.credentials(cfg.signer).signer()
            if signer is None:
                raise ConfigError(
                    self.settings.options.key("signer"),
                    f"credentials {cfg.signer!r} provide no signing key",
                )
            return signer
        if self._local_signer is None:
            raise CredentialError(f"credentials {self.settings.name!r} used before load()")
        return self._local_signer

    async def _http(self) -> aiohttp.ClientSession:
        """The HTTP client, rebuilt when the trust or identity material has rotated."""
        cfg = self._cfg
        trust = self.context.credentials(cfg.trust).trust_anchors()
        if trust is None:
            raise CredentialError(
                f"credentials {cfg.trust!r} provide no trust anchors for the token endpoint"
            )
        identity: TlsIdentity | None = None
        if cfg.identity is not None:
            identity = self.context.credentials(cfg.identity).tls_identity()
            if identity is None:
                raise CredentialError(f"credentials {cfg.identity!r} provide no TLS identity")
        material = (trust, identity)
        if self._session is None or material != self._session_material:
            if self._session is not None:
                await self._session.close()
            connector = aiohttp.TCPConnector(ssl=client_context(trust, identity))
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=cfg.timeout)
            )
            self._session_material = material
        return self._session


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except ValueError:
        return None


def _parse_token(body: Any, url: str) -> tuple[str, float]:
    if not isinstance(body, dict):
        raise CredentialError(f"token endpoint {url} answered 200 without a JSON object")
    token, token_type = body.get("access_token"), body.get("token_type")
    if not isinstance(token, str) or not token:
        raise CredentialError(f"token endpoint {url} answered without access_token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise CredentialError(f"token endpoint {url} issued an unsupported token_type")
    expires_in = body.get("expires_in")
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        # Without a lifetime we cannot cache safely: use the token for one request only.
        expires_in = 0.0
    return token, float(expires_in)
