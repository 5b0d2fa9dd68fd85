"""Entry point of the gatewayd-pkcs11 plugin: registers its classes with gatewayd."""
