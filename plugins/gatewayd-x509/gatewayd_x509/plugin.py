"""Entry point of the gatewayd-x509 plugin: registers its classes with gatewayd."""
