"""TLS contexts for the listener and the webhook client, built with the stdlib.

gatewayd's own helpers (``gatewayd.security.tls``) are not part of the plugin API, so
this module applies the same profile: TLS 1.2 or newer, OpenSSL security level 2,
strict X.509 checks, no compression or renegotiation.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

from gatewayd.api import ConfigError, CredentialError, TlsIdentity, TrustAnchors

_CIPHERS = "DEFAULT:@SECLEVEL=2"


def server_context(
    identity: TlsIdentity, trust: TrustAnchors | None, *, require_client_cert: bool
) -> ssl.SSLContext:
    """The listener's context; with ``require_client_cert`` an unverified peer never
    completes the handshake, so it never reaches HTTP."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_identity(ctx, identity)
    if trust is not None:
        _load_trust(ctx, trust)
    if require_client_cert:
        if trust is None:
            raise CredentialError("device_auth = client_cert needs trust anchors for devices")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def webhook_context(ca_file: Path | None, key: str) -> ssl.SSLContext:
    """The context for calling a device's webhook: its own CA if given, else the
    system's trust store. Hostnames are always checked."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return ctx
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(key, f"cannot load CA file {ca_file}: {exc}") from None
    return ctx


def _base(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _load_trust(ctx: ssl.SSLContext, trust: TrustAnchors) -> None:
    try:
        ctx.load_verify_locations(cadata=trust.ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise CredentialError(f"trust anchors are not valid PEM certificates: {exc}") from None
    for crl in trust.crl_pem:
        # cadata takes certificates only; a CRL has to come in through a file.
        with _memfile(crl) as path:
            try:
                ctx.load_verify_locations(cafile=path)
            except ssl.SSLError as exc:
                raise CredentialError(f"a CRL is not valid PEM: {exc}") from None
    if trust.crl_pem:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _load_identity(ctx: ssl.SSLContext, identity: TlsIdentity) -> None:
    # load_cert_chain only takes paths: anonymous memory files keep the key off disk.
    with _memfile(identity.cert_chain_pem) as chain, _memfile(identity.key_pem) as key:
        try:
            ctx.load_cert_chain(chain, key)
        except ssl.SSLError as exc:
            raise CredentialError(
                f"certificate and key do not load or do not match: {exc.reason or exc}"
            ) from None


@contextlib.contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("gatewayd-http-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def peer_names(ssl_object: ssl.SSLObject | None) -> tuple[str, ...]:
    """The verified peer certificate's URI and DNS subjectAltNames, URIs first."""
    if ssl_object is None:
        return ()
    cert = ssl_object.getpeercert()
    if not cert:
        return ()
    # typeshed types the values loosely; subjectAltName is ((kind, value), ...).
    san: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    uris = [str(value) for kind, value in san if kind == "URI"]
    dns = [str(value) for kind, value in san if kind == "DNS"]
    return (*uris, *dns)
