"""Entry point of the gatewayd-x509 plugin: registers its classes with gatewayd."""

from __future__ import annotations

from gatewayd.api import CredentialFactory, Registry, hookimpl
from gatewayd_x509.backend import SystemdBackend, X509Backend

GATEWAYD_API_VERSION = "1.0"


@hookimpl
def gatewayd_register_credential_backends(registry: Registry[CredentialFactory]) -> None:
    """Offer ``x509`` (files) and ``systemd`` (systemd credentials); same options for both."""
    registry.add("x509", X509Backend)
    registry.add("systemd", SystemdBackend)
