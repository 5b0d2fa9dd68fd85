"""Entry point of the gatewayd-http plugin: registers its classes with gatewayd."""
