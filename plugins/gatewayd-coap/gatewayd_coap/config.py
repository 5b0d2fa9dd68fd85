"""The ``[transports.NAME]`` keys of the coap transport, read once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from gatewayd.api import Options, TransportSettings, is_loopback

DEFAULT_PORT = 5683  # RFC 7252 12.6


@dataclass(frozen=True, slots=True, kw_only=True)
class CoapConfig:
    host: str
    port: int
    max_body: int
    delivery_timeout: float
    endpoints: dict[str, str]  # device name -> coap:// URI of its inbox


def read_config(settings: TransportSettings) -> CoapConfig:
    opts = settings.options
    listen = opts.get_listen("listen", None)
    host, port = (listen.host, listen.port) if listen else ("127.0.0.1", DEFAULT_PORT)
    # Without DTLS or OSCORE (see docs/transports/coap.md) a device is whoever claims
    # its name, and every byte is readable: keep it on this host.
    if not is_loopback(host):
        raise opts.error(
            "listen",
            f"{host} is not a loopback address; CoAP without DTLS or OSCORE is not "
            "authenticated, so this transport only listens on loopback",
        )
    max_body = opts.get_int("max_body", 1024, minimum=64)
    delivery_timeout = opts.get_float("delivery_timeout", 30.0, minimum=0.1)
    opts.check_unknown()
    endpoints = {}
    for i, device in enumerate(settings.devices):
        dopts = settings.device_options(i)
        endpoint = dopts.get_str("endpoint", None)
        if endpoint is not None:
            endpoints[device.name] = _endpoint(dopts, endpoint)
        dopts.check_unknown()
    return CoapConfig(
        host=host,
        port=port,
        max_body=max_body,
        delivery_timeout=delivery_timeout,
        endpoints=endpoints,
    )


def _endpoint(opts: Options, uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme != "coap" or not parts.hostname:
        raise opts.error("endpoint", f"expected a coap:// URI, got {uri!r}")
    if not is_loopback(parts.hostname):
        raise opts.error(
            "endpoint",
            f"{parts.hostname} is not a loopback address; plain CoAP downlink stays on this host",
        )
    return uri
