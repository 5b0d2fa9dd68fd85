"""TLS contexts for both legs, built from credential material held in memory.

Profile (TS 33.501 Annex Y.5 via TS 33.210 6.2): TLS 1.2 or newer, certificates
verified strictly (``VERIFY_X509_STRICT``), OpenSSL security level 2 so RSA keys under
2048 bits are refused, CRLs checked for the leaf when the trust material carries any.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gatewayd.errors import CredentialError
from gatewayd.security.material import TlsIdentity, TrustAnchors

# OpenSSL's "DEFAULT" cipher list, with security level 2: >= 112-bit security, so RSA
# and DH under 2048 bits and SHA-1 signatures are refused on both sides.
_CIPHERS = "DEFAULT:@SECLEVEL=2"


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
        return identity in self.uris or identity in self.dns_names


def client_context(
    trust: TrustAnchors | None,
    identity: TlsIdentity | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A context for calling a server: the server must prove the expected identity.

    Without ``trust`` the system's trust store vouches for servers (public webhooks).
    """
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, trust)
    if trust is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = check_hostname
    if identity is not None:
        load_identity(ctx, identity)
    return ctx


def server_context(
    identity: TlsIdentity, trust: TrustAnchors | None, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A context for serving: with ``require_client_cert`` no handshake completes without
    a client certificate from ``trust``, so an unverified peer never reaches HTTP."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, trust)
    load_identity(ctx, identity)
    if require_client_cert:
        if trust is None:
            raise CredentialError("a server that requires client certificates needs trust anchors")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _base(protocol: int, trust: TrustAnchors | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
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
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def load_identity(ctx: ssl.SSLContext, identity: TlsIdentity) -> None:
    """Load a chain and key without writing the key to disk.

    ``load_cert_chain`` only takes paths, so the material goes through anonymous memory
    files (memfd), visible to this process alone and gone when closed.
    """
    with _memfile(identity.cert_chain_pem) as chain, _memfile(identity.key_pem) as key:
        try:
            ctx.load_cert_chain(chain, key)
        except ssl.SSLError as exc:
            raise CredentialError(
                f"certificate and key do not load or do not match: {exc.reason or exc}"
            ) from None


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
