"""Entry point of the gatewayd-oauth2 plugin: registers its classes with gatewayd."""

from __future__ import annotations

from gatewayd.api import CredentialFactory, Registry, hookimpl
from gatewayd_oauth2.backend import OAuth2Backend

GATEWAYD_API_VERSION = "1.0"


@hookimpl
def gatewayd_register_credential_backends(registry: Registry[CredentialFactory]) -> None:
    """Offer ``oauth2``: client-credentials access tokens from a token endpoint."""
    registry.add("oauth2", OAuth2Backend)
