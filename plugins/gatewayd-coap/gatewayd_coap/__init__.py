"""gatewayd-coap: constrained devices over CoAP (RFC 7252) with JSON bodies, N3G role."""
