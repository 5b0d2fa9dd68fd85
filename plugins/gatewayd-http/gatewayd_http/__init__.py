"""gatewayd-http plugin."""
