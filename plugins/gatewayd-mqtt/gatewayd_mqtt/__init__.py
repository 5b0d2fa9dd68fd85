"""gatewayd-mqtt plugin."""
