"""Entry point of the gatewayd-pkcs11 plugin: registers its classes with gatewayd."""

from __future__ import annotations

from gatewayd.api import CredentialFactory, Registry, hookimpl
from gatewayd_pkcs11.backend import Pkcs11Backend

GATEWAYD_API_VERSION = "1.0"


@hookimpl
def gatewayd_register_credential_backends(registry: Registry[CredentialFactory]) -> None:
    """Offer ``pkcs11``: a signing key held in a PKCS#11 token."""
    registry.add("pkcs11", Pkcs11Backend)
