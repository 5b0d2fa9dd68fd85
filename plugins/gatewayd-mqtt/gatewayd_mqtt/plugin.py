"""Entry point of the gatewayd-mqtt plugin: registers its classes with gatewayd."""
