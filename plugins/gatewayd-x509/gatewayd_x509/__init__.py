"""gatewayd-x509 plugin."""
