"""Entry point of the gatewayd-oauth2 plugin: registers its classes with gatewayd."""
