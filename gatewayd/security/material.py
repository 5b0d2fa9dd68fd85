"""Credential material as it travels from a backend to the TLS layer: in memory only."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsIdentity:
    """Our own X.509 identity: a PEM chain (leaf first) and its unencrypted PEM key."""

    cert_chain_pem: bytes
    key_pem: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustAnchors:
    """Whom we trust: CA certificates (PEM) and, optionally, CRLs (PEM) for them."""

    ca_pem: bytes
    crl_pem: tuple[bytes, ...] = ()
