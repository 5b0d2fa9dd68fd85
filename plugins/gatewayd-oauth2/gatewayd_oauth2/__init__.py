"""gatewayd-oauth2 plugin."""
