"""gatewayd-pkcs11 plugin."""
