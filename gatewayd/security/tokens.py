"""OAuth 2.0 access tokens (TS 33.501 clause 13.4.1): JWS-signed JWTs, issued and verified.

:func:`verify_token` is what a producer (our inbound API, the reference server) runs on
every request. Its policy is pinned: the algorithms and the verification key come from
configuration, never from the token, which closes the classic JWT holes: ``alg: none``,
an HMAC algorithm "signed" with the public key (key confusion), a ``jku``/``x5u`` header
pointing at the attacker's key. Certificate-bound tokens (RFC 8705) are checked against
the certificate the peer presented in *this* TLS connection.

:class:`TokenIssuer` is the authorization server's side, for the reference server and
tests. Nothing here logs: tokens are secrets and the callers decide what to record
(``reason``, never the token).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gatewayd.errors import ConfigError, TokenRejectedError
from gatewayd.options import Options
from gatewayd.security.tls import PeerIdentity

# TokenRejectedError lives in gatewayd.errors (the one exception root) and is re-exported
# here, next to the verifier that raises it.
__all__ = [
    "ALLOWED_ALGORITHMS",
    "CNF_THUMBPRINT",
    "REASONS",
    "Claims",
    "TokenGate",
    "TokenIssuer",
    "TokenPolicy",
    "TokenRejectedError",
    "bearer_token",
    "cert_thumbprint",
    "read_gate",
    "verify_token",
]

# Asymmetric algorithms only: with a pinned public key, an HMAC algorithm would let
# anyone who knows that (public) key mint tokens.
_FAMILIES: Final[dict[str, type]] = {
    **dict.fromkeys(("ES256", "ES384", "ES512"), ec.EllipticCurvePublicKey),
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), rsa.RSAPublicKey),
    "EdDSA": ed25519.Ed25519PublicKey,
}
ALLOWED_ALGORITHMS: Final = tuple(_FAMILIES)

_PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

CNF_THUMBPRINT: Final = "x5t#S256"

REASONS: Final = (
    "missing",
    "expired",
    "not_yet_valid",
    "bad_audience",
    "bad_issuer",
    "alg_not_allowed",
    "bad_signature",
    "missing_scope",
    "cnf_mismatch",
    "subject_mismatch",
    "malformed",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenPolicy:
    """What a producer accepts. Everything that decides trust is pinned here.

    ``audience`` is one name or several (a producer known by its NF type, instance id,
    and host names). ``required_scope`` is space-separated; every listed scope must be granted.
    ``leeway`` (seconds) absorbs clock skew on ``exp``, ``nbf`` and ``iat``. With
    ``require_cnf`` only certificate-bound tokens are accepted; a bound token is checked
    against the peer certificate in any case.
    """

    issuer: str
    audience: str | tuple[str, ...]  # a token must name at least one of them in ``aud``
    verification_key_pem: bytes = field(repr=False)
    algorithms: tuple[str, ...] = ("ES256",)
    required_scope: str | None = None
    leeway: float = 30.0
    require_cnf: bool = False

    def __post_init__(self) -> None:
        if not self.audience:
            raise ConfigError("audience", "at least one audience is required")
        if not self.algorithms:
            raise ConfigError("algorithms", "at least one algorithm is required")
        key = _public_key(self.verification_key_pem)
        for alg in self.algorithms:
            family = _FAMILIES.get(alg)
            if family is None:
                raise ConfigError(
                    "algorithms",
                    f"{alg!r} is not allowed; use one of {', '.join(ALLOWED_ALGORITHMS)}",
                )
            if not isinstance(key, family):
                raise ConfigError("algorithms", f"{alg} does not fit the verification key type")


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    """The verified content of an access token."""

    issuer: str
    subject: str
    audience: tuple[str, ...]
    scopes: frozenset[str]
    expires_at: dt.datetime
    issued_at: dt.datetime | None = None
    token_id: str | None = None
    cert_thumbprint: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


def cert_thumbprint(cert_der: bytes) -> str:
    """The RFC 8705 ``x5t#S256`` value: base64url (unpadded) SHA-256 of the DER cert."""
    digest = hashlib.sha256(cert_der).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=32)
def _public_key(pem: bytes) -> _PublicKey:
    # Parsed once per distinct key: verification runs on every inbound request.
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise ConfigError("verification_key", "not a PEM public key") from None
    if not isinstance(key, _PublicKey):
        raise ConfigError("verification_key", "only EC, RSA and Ed25519 keys sign tokens")
    return key


# PyJWT's exception -> our stable reason. Order matters: subclasses before bases.
_REASON_OF: Final[tuple[tuple[type[Exception], str], ...]] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.InvalidAlgorithmError, "alg_not_allowed"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.MissingRequiredClaimError, "malformed"),
    (jwt.InvalidTokenError, "malformed"),
)


def verify_token(token: str, policy: TokenPolicy, *, peer_cert_der: bytes | None) -> Claims:
    """Verify ``token`` under ``policy``; ``peer_cert_der`` is the TLS client certificate
    of the connection the token arrived on (``None`` without one).

    Raises :class:`TokenRejectedError` with a stable ``reason``.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise TokenRejectedError("malformed", "not a JWS compact token") from None
    alg = header.get("alg")
    # Checked before any cryptography, so "none" and HS* never reach a verifier.
    if not isinstance(alg, str) or alg not in policy.algorithms:
        raise TokenRejectedError(
            "alg_not_allowed", f"algorithm {alg!r} is not one of {', '.join(policy.algorithms)}"
        )
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            _public_key(policy.verification_key_pem),
            algorithms=list(policy.algorithms),
            audience=policy.audience,
            issuer=policy.issuer,
            leeway=policy.leeway,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.InvalidTokenError as exc:
        reason = next(r for kind, r in _REASON_OF if isinstance(exc, kind))
        # PyJWT's messages name claims, never values, so they are safe to pass on.
        raise TokenRejectedError(reason, str(exc)) from None
    except (TypeError, ValueError, OverflowError):
        # PyJWT converts exp/nbf/iat with int() and lets some failures through.
        raise TokenRejectedError("malformed", "a time claim is not a NumericDate") from None
    claims = _claims(payload)
    if policy.required_scope:
        missing = sorted(set(policy.required_scope.split()) - claims.scopes)
        if missing:
            raise TokenRejectedError("missing_scope", f"scope {' '.join(missing)} not granted")
    _check_binding(claims, policy, peer_cert_der)
    return claims


def _claims(payload: dict[str, Any]) -> Claims:
    sub, iss, scope = payload.get("sub"), payload.get("iss"), payload.get("scope", "")
    aud = payload.get("aud")
    audience = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else ()
    if not isinstance(sub, str) or not isinstance(iss, str) or not isinstance(scope, str):
        raise TokenRejectedError("malformed", "sub, iss and scope must be strings")
    cnf = payload.get("cnf")
    thumbprint: str | None = None
    if cnf is not None:
        value = cnf.get(CNF_THUMBPRINT) if isinstance(cnf, dict) else None
        if not isinstance(value, str):
            # A confirmation we cannot check must not be ignored: that would unbind it.
            raise TokenRejectedError("cnf_mismatch", f"cnf without a usable {CNF_THUMBPRINT}")
        thumbprint = value
    # PyJWT checks exp/nbf/iat after int(), so "1234" passes it: RFC 7519 2 wants a
    # JSON number, within the range a date can hold.
    expires_at = numeric_date(payload["exp"], "exp")
    if "nbf" in payload:
        numeric_date(payload["nbf"], "nbf")
    iat = payload.get("iat")
    jti = payload.get("jti")
    return Claims(
        issuer=iss,
        subject=sub,
        audience=audience,
        scopes=frozenset(scope.split()),
        expires_at=expires_at,
        issued_at=numeric_date(iat, "iat") if iat is not None else None,
        token_id=jti if isinstance(jti, str) else None,
        cert_thumbprint=thumbprint,
        raw=payload,
    )


def numeric_date(value: object, claim: str) -> dt.datetime:
    """A JWT NumericDate claim as a datetime; ``malformed`` for any other type or range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejectedError("malformed", f"{claim} is not a number")
    try:
        return dt.datetime.fromtimestamp(value, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise TokenRejectedError("malformed", f"{claim} is out of range") from None


def _check_binding(claims: Claims, policy: TokenPolicy, peer_cert_der: bytes | None) -> None:
    if claims.cert_thumbprint is None:
        if policy.require_cnf:
            raise TokenRejectedError("cnf_mismatch", "the token is not bound to a certificate")
        return
    if peer_cert_der is None:
        raise TokenRejectedError(
            "cnf_mismatch", "a certificate-bound token arrived without a client certificate"
        )
    if not hmac.compare_digest(claims.cert_thumbprint, cert_thumbprint(peer_cert_der)):
        raise TokenRejectedError(
            "cnf_mismatch", "the token is bound to another certificate than the peer's"
        )


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header (RFC 6750 2.1).

    Raises :class:`TokenRejectedError` ``missing`` without the header, ``malformed``
    for another scheme or an empty token.
    """
    if not authorization:
        raise TokenRejectedError("missing", "no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise TokenRejectedError("malformed", "the Authorization header is not a Bearer token")
    return token


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenGate:
    """A producer's token requirement: the pinned :class:`TokenPolicy`, whether a token
    is required, and the checks that tie it to the TLS connection it arrived on."""

    policy: TokenPolicy
    required: bool = True

    def check(
        self, authorization: str | None, *, peer_cert_der: bytes | None, peer: PeerIdentity | None
    ) -> Claims | None:
        """Verify the request's bearer token; ``None`` when there is none and none is
        required. A token that is present is always verified, required or not.

        The token's ``sub`` must be an identity of the peer certificate: a token that
        names one party arriving over another party's authenticated connection is
        refused even when it is not certificate-bound (TS 33.501 13.4.1: the consumer
        instance in the token is the one the producer talks to).
        """
        if authorization is None and not self.required:
            return None
        claims = verify_token(bearer_token(authorization), self.policy, peer_cert_der=peer_cert_der)
        if peer is None or not peer.matches(claims.subject):
            raise TokenRejectedError(
                "subject_mismatch", "the token's subject is not the peer certificate's identity"
            )
        return claims

    def challenge(self, refusal: TokenRejectedError) -> tuple[int, str]:
        """The HTTP status and ``WWW-Authenticate`` value for a refusal (RFC 6750 3).

        No token: a bare challenge (3.1: no error code when no credentials came). A
        scope it lacks: 403 ``insufficient_scope`` naming the scope needed. Anything
        else: 401 ``invalid_token``; the reason itself stays in our log, never on the wire.
        """
        if refusal.reason == "missing":
            return 401, "Bearer"
        if refusal.reason == "missing_scope":
            scope = self.policy.required_scope or ""
            return 403, f'Bearer error="insufficient_scope", scope="{scope}"'
        return 401, 'Bearer error="invalid_token"'


def read_gate(
    options: Options, *, default_audience: str, default_scope: str, base: Path
) -> TokenGate:
    """A :class:`TokenGate` from a config table (the gateway's ``[api.token]``).

    Keys: ``issuer``, ``audience`` (string or list), ``scope``, ``key`` (PEM public key
    file of the authorization server), ``algorithms``, ``require``, ``require_binding``,
    ``leeway``. Every error names the key.
    """
    issuer = options.get_str("issuer")
    audience: str | tuple[str, ...]
    try:
        audience = options.get_str("audience", default_audience)
    except ConfigError:
        # Not a string: a list of names (raw() would mark every key as read).
        audience = options.get_str_list("audience")
    scope = options.get_str("scope", default_scope)
    key_path = options.get_path("key", base=base)
    algorithms = options.get_str_list("algorithms", ("ES256",))
    required = options.get_bool("require", True)
    require_binding = options.get_bool("require_binding", False)
    leeway = options.get_float("leeway", 30.0)
    options.check_unknown()
    try:
        key_pem = key_path.read_bytes()
    except OSError as exc:
        raise options.error("key", f"cannot read {key_path}: {exc.strerror}") from None
    try:
        policy = TokenPolicy(
            issuer=issuer,
            audience=audience,
            verification_key_pem=key_pem,
            algorithms=algorithms,
            required_scope=scope or None,
            leeway=leeway,
            require_cnf=require_binding,
        )
    except ConfigError as exc:
        # TokenPolicy names its own field; point at the config key instead.
        name = "key" if exc.key == "verification_key" else exc.key
        raise options.error(name, exc.problem) from None
    return TokenGate(policy=policy, required=required)


class TokenIssuer:
    """Signs access tokens as an authorization server (NRF) would: the reference side.

    ``key_pem`` is an unencrypted PEM private key: EC P-256 for ES256, RSA for RS256.
    """

    def __init__(
        self,
        *,
        issuer: str,
        key_pem: bytes,
        algorithm: str = "ES256",
        key_id: str | None = None,
        lifetime: float = 300.0,
    ) -> None:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError("key", "not an unencrypted PEM private key") from None
        if not isinstance(key, _PrivateKey):
            raise ConfigError("key", "only EC, RSA and Ed25519 keys sign tokens")
        family = _FAMILIES.get(algorithm)
        if family is None or not isinstance(key.public_key(), family):
            raise ConfigError("algorithm", f"{algorithm!r} does not fit the signing key")
        self.issuer = issuer
        self.algorithm = algorithm
        self.key_id = key_id
        self.lifetime = lifetime
        self._key: _PrivateKey = key

    @property
    def public_key_pem(self) -> bytes:
        """The verification key, for :class:`TokenPolicy`."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def policy(self, *, audience: str | tuple[str, ...], **kwargs: Any) -> TokenPolicy:
        """A :class:`TokenPolicy` that accepts this issuer's tokens for ``audience``."""
        return TokenPolicy(
            issuer=self.issuer,
            audience=audience,
            verification_key_pem=self.public_key_pem,
            algorithms=(self.algorithm,),
            **kwargs,
        )

    def issue(
        self,
        *,
        subject: str,
        audience: str | list[str],
        scope: str,
        lifetime: float | None = None,
        client_cert_der: bytes | None = None,
        now: dt.datetime | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed token; with ``client_cert_der`` it is bound to that certificate."""
        now = now or dt.datetime.now(dt.UTC)
        exp = now + dt.timedelta(seconds=self.lifetime if lifetime is None else lifetime)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "scope": scope,
            "iat": int(now.timestamp()),
            "exp": int(exp.timestamp()),
            "jti": str(uuid.uuid4()),
            **(extra or {}),
        }
        if client_cert_der is not None:
            claims["cnf"] = {CNF_THUMBPRINT: cert_thumbprint(client_cert_der)}
        headers = {"kid": self.key_id} if self.key_id else None
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)
