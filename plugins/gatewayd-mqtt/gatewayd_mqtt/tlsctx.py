"""The TLS context for the broker connection, built from a credential backend.

TODO(core): ``gatewayd.security.tls.client_context`` does the same and should be
re-exported from ``gatewayd.api``; plugins may import nothing else, hence this copy.
Profile kept identical: TLS 1.2 or newer, strict X.509 checks, security level 2,
leaf CRL checks when the trust material carries CRLs.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator

from gatewayd.api import CredentialError, TlsIdentity, TrustAnchors


def client_context(trust: TrustAnchors, identity: TlsIdentity | None) -> ssl.SSLContext:
    """A client context: the broker must prove its name; we show ``identity`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname check and CERT_REQUIRED on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("DEFAULT:@SECLEVEL=2")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cadata=trust.ca_pem.decode("ascii"))
        for crl in trust.crl_pem:
            # cadata takes certificates only: a CRL has to come in as a (memory) file.
            with _memfile(crl) as path:
                ctx.load_verify_locations(cafile=path)
        if trust.crl_pem:
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if identity is not None:
            # load_cert_chain takes paths only; memfd keeps the key off the disk.
            with (
                _memfile(identity.cert_chain_pem) as chain,
                _memfile(identity.key_pem) as key,
            ):
                ctx.load_cert_chain(chain, key)
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise CredentialError(f"MQTT TLS material does not load: {exc}") from None
    return ctx


@contextlib.contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("gatewayd-mqtt-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
