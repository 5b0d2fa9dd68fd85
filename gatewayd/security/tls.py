"""TLS contexts for both legs, built from credential material held in memory.

Profile (TS 33.501 Annex Y.5 via TS 33.210 6.2): TLS 1.2 or newer, TLS 1.2 with ECDHE
and AEAD suites only, certificates verified strictly (``VERIFY_X509_STRICT``), OpenSSL
security level 2 so RSA keys under 2048 bits are refused, CRLs checked for every
certificate of the chain when the trust material carries any.

Server contexts also name every refused handshake in the log (``auth.peer_rejected``,
``direction="inbound"``): asyncio drops a server-side handshake error silently, and an
aiohttp application never sees a connection whose handshake failed, so the context's
own ``SSLObject`` class is the one place that learns why. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from gatewayd.errors import CredentialError
from gatewayd.security.material import TlsIdentity, TrustAnchors

log = structlog.get_logger(__name__)

# TLS 1.2 suites per the TS 33.210 profile: forward secrecy (ECDHE) and AEAD only, so no
# CBC and no SHA-1 MAC. TLS 1.3 suites are all AEAD and are not affected by this string.
# Security level 2: >= 112-bit security, so RSA and DH under 2048 bits and SHA-1
# signatures are refused on both sides.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:@SECLEVEL=2"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who the peer's certificate says it is. ``primary`` is what policies match on:
    the first URI SAN (3GPP NF instance ids are URIs), else the first DNS SAN."""

    uris: tuple[str, ...]
    dns_names: tuple[str, ...]

    @property
    def primary(self) -> str:
        if self.uris:
            return self.uris[0]
        if self.dns_names:
            return self.dns_names[0]
        return ""

    def matches(self, identity: str) -> bool:
        """Any URI or DNS SAN: for our own certificate, which may carry several names."""
        return identity in self.uris or identity in self.dns_names

    def is_identity(self, identity: str) -> bool:
        """Whether ``identity`` is this peer's primary identity: what authorization uses.
        A second SAN (a shared host name, say) never makes a peer someone else."""
        return bool(identity) and self.primary == identity


def client_context(
    trust: TrustAnchors | None,
    identity: TlsIdentity | None = None,
    *,
    check_hostname: bool = True,
    expected_identity: str | None = None,
) -> ssl.SSLContext:
    """A context for calling a server: the server must prove the expected identity.

    Without ``trust`` the system's trust store vouches for servers (public webhooks).
    ``expected_identity`` (e.g. a 3GPP NF instance URN) must be the server's primary
    identity (first URI SAN, else first DNS SAN); it is checked inside the handshake, on
    top of the host name: a server that lacks it never receives a byte of HTTP.
    """
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, trust)
    if trust is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = check_hostname
    if expected_identity is not None:
        ctx.sslobject_class = type(
            "IdentityCheckingSSLObject",
            (_IdentityCheckingSSLObject,),
            {"expected_identity": expected_identity},
        )
    if identity is not None:
        load_identity(ctx, identity)
    return ctx


def server_context(
    identity: TlsIdentity, trust: TrustAnchors | None, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A context for serving: with ``require_client_cert`` no handshake completes without
    a client certificate from ``trust``, so an unverified peer never reaches HTTP."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, trust)
    ctx.sslobject_class = _AuditedSSLObject
    load_identity(ctx, identity)
    if require_client_cert:
        if trust is None:
            raise CredentialError("a server that requires client certificates needs trust anchors")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _base(protocol: int, trust: TrustAnchors | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if trust is not None:
        load_trust(ctx, trust)
    return ctx


def load_trust(ctx: ssl.SSLContext, trust: TrustAnchors) -> None:
    try:
        ctx.load_verify_locations(cadata=trust.ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise CredentialError(f"trust anchors are not valid PEM certificates: {exc}") from None
    if trust.crl_pem:
        for crl in trust.crl_pem:
            # cadata accepts certificates only; a CRL has to come in through cafile.
            with _memfile(crl) as path:
                try:
                    ctx.load_verify_locations(cafile=path)
                except ssl.SSLError as exc:
                    raise CredentialError(f"a CRL is not valid PEM: {exc}") from None
        # The whole chain, not only the leaf: a revoked intermediate CA must not keep
        # vouching for the certificates it issued.
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def load_identity(ctx: ssl.SSLContext, identity: TlsIdentity) -> None:
    """Load a chain and key without writing the key to disk.

    ``load_cert_chain`` only takes paths, so the material goes through anonymous memory
    files (memfd), visible to this process alone and gone when closed.
    """
    with _memfile(identity.cert_chain_pem) as chain, _memfile(identity.key_pem) as key:
        try:
            ctx.load_cert_chain(chain, key)
        except ssl.SSLError as exc:
            if exc.reason in _WEAK_KEY_REASONS:
                raise CredentialError(
                    f"the certificate's key is too weak for the TLS profile ({exc.reason}): "
                    "RSA keys need at least 2048 bits"
                ) from None
            raise CredentialError(
                f"certificate and key do not load or do not match: {exc.reason or exc}"
            ) from None


# OpenSSL's names for "this key is below the security level" when loading our own chain.
_WEAK_KEY_REASONS = frozenset({"EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"})


class _IdentityCheckingSSLObject(ssl.SSLObject):
    """Refuses a verified peer whose primary identity is not ``expected_identity``."""

    expected_identity = ""

    def do_handshake(self) -> None:
        super().do_handshake()
        peer = peer_identity(self)
        if peer is None or not peer.is_identity(self.expected_identity):
            # SSLCertVerificationError makes asyncio abort the connection as a failed
            # handshake, and aiohttp report it as a certificate error.
            raise ssl.SSLCertVerificationError(
                f"peer certificate does not name {self.expected_identity!r}"
            )


class _AuditedSSLObject(ssl.SSLObject):
    """An ``SSLObject`` that logs why a server-side handshake failed, then re-raises.

    asyncio creates one per accepted connection through ``SSLContext.sslobject_class``
    (a public hook) and discards handshake errors without a word; this is the only
    place the reason is known. The peer's address is not known here (an SSLObject has
    no socket), so the line carries what OpenSSL says: the verification failure or the
    protocol problem.
    """

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # not a failure: the handshake needs more bytes
        except ssl.SSLError as exc:
            if not self.server_side:
                raise  # client contexts do not use this class; the caller reports
            _log_inbound_failure(exc)
            raise


def _log_inbound_failure(exc: ssl.SSLError) -> None:
    reason = handshake_reason(exc)
    if "ALERT" in (exc.reason or ""):
        # The caller aborted with an alert: it refused us (or our chain), not we it.
        log.warning("auth.tls_failed", direction="inbound", reason=reason)
    else:
        log.warning("auth.peer_rejected", direction="inbound", stage="tls", reason=reason)


def handshake_reason(exc: ssl.SSLError) -> str:
    """A short, stable reason for a handshake failure: OpenSSL's verification message
    (``certificate has expired``) or its reason code (``UNSUPPORTED_PROTOCOL``)."""
    # Errors raised by our own identity check carry neither attribute: only OpenSSL's do.
    message = getattr(exc, "verify_message", None)
    if isinstance(exc, ssl.SSLCertVerificationError) and message:
        return str(message)
    return str(getattr(exc, "reason", None) or exc)


@contextlib.contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("gatewayd-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerIdentity | None:
    """The verified peer's identity, or ``None`` when it presented no certificate."""
    if ssl_object is None:
        return None
    cert: dict[str, Any] | None = ssl_object.getpeercert()
    if not cert:
        return None
    san = cert.get("subjectAltName", ())
    return PeerIdentity(
        uris=tuple(value for kind, value in san if kind == "URI"),
        dns_names=tuple(value for kind, value in san if kind == "DNS"),
    )
