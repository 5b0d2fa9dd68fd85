"""The TLS client context for the token endpoint, built from backend material in memory.

This mirrors ``gatewayd.security.tls.client_context`` (same profile: TLS >= 1.2,
strict X.509 checks, security level 2, CRLs for the leaf), because plugins may import
only ``gatewayd.api``. Replace it with the core's builder once ``gatewayd.api``
re-exports one.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator

from gatewayd.api import CredentialError, TlsIdentity, TrustAnchors


def client_context(trust: TrustAnchors, identity: TlsIdentity | None) -> ssl.SSLContext:
    """A context that verifies the token endpoint and, optionally, presents our identity."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("DEFAULT:@SECLEVEL=2")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cadata=trust.ca_pem.decode("ascii"))
        for crl in trust.crl_pem:
            # cadata takes certificates only; a CRL has to come in as a file.
            with _memfile(crl) as path:
                ctx.load_verify_locations(cafile=path)
        if trust.crl_pem:
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if identity is not None:
            with _memfile(identity.cert_chain_pem) as chain, _memfile(identity.key_pem) as key:
                ctx.load_cert_chain(chain, key)
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise CredentialError(
            f"cannot build the TLS context for the token endpoint: {exc}"
        ) from None
    return ctx


@contextlib.contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    # load_cert_chain takes paths only: an anonymous memory file keeps the key off disk.
    fd = os.memfd_create("gatewayd-oauth2", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
