"""gatewayd-mqtt: devices on an MQTT 3.1.1 / 5 broker, as an N3G transport of gatewayd."""
