"""The transport's own configuration: the ``[transports.NAME]`` keys and per-device keys.

Read once at construction so a bad config fails at start, naming the key path; secrets
stay :class:`SecretRef` until :meth:`HttpTransport.start` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gatewayd.api import ListenerLimits, Options, SecretRef, TransportSettings, read_listener_limits

BEARER = "bearer"
CLIENT_CERT = "client_cert"
_AUTH_MODES = (BEARER, CLIENT_CERT)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    """One device's HTTP-side settings (from its ``[[transports.NAME.devices]]`` table)."""

    name: str
    key_path: str
    webhook: str | None = None
    token: SecretRef | None = None
    identity: str | None = None
    webhook_ca: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """The listener, the device authentication mode and the webhook client settings."""

    host: str
    port: int
    tls: str | None
    webhook_identity: str | None
    device_auth: str
    max_body: int
    delivery_timeout: float
    devices: tuple[DeviceConfig, ...]
    limits: ListenerLimits  # idle/header timeouts and the connection cap of the listener

    @classmethod
    def from_settings(cls, settings: TransportSettings) -> HttpConfig:
        """Read and check every key; raise :class:`ConfigError` naming the first bad one."""
        opts = settings.options
        listen = opts.get_listen("listen")
        host, port = listen.host, listen.port
        tls = opts.get_str("tls", None)
        webhook_identity = opts.get_str("webhook_identity", None)
        device_auth = opts.get_choice("device_auth", _AUTH_MODES, BEARER)
        max_body = opts.get_int("max_body", 65536, minimum=1)
        delivery_timeout = opts.get_float("delivery_timeout", 10.0, minimum=0.001)
        limits = read_listener_limits(opts)
        opts.check_unknown()
        if device_auth == CLIENT_CERT and tls is None:
            # Client certificates only exist inside TLS: without a listener identity there
            # is nothing to authenticate devices with.
            raise opts.error("device_auth", 'client_cert needs "tls" (a [credentials.*] name)')
        devices = tuple(
            _read_device(
                settings.device_options(i),
                device.name,
                device_auth,
                settings.base_dir,
            )
            for i, device in enumerate(settings.devices)
        )
        return cls(
            host=host,
            port=port,
            tls=tls,
            webhook_identity=webhook_identity,
            device_auth=device_auth,
            max_body=max_body,
            delivery_timeout=delivery_timeout,
            devices=devices,
            limits=limits,
        )


def _read_device(opts: Options, name: str, device_auth: str, base: Path) -> DeviceConfig:
    webhook = opts.get_str("webhook", None)
    if webhook is not None:
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise opts.error("webhook", f"expected an http:// or https:// URL, got {webhook!r}")
    # Each mode requires its own credential; the other one is refused rather than
    # silently ignored, so a config never suggests a protection that is not applied.
    token = opts.secret("token") if device_auth == BEARER else None
    identity = opts.get_str("identity", None) if device_auth == CLIENT_CERT else None
    if device_auth == CLIENT_CERT and not identity:
        raise opts.error("identity", "is required when device_auth = client_cert")
    webhook_ca = opts.get_path("webhook_ca", None, base=base)
    opts.check_unknown()
    return DeviceConfig(
        name=name,
        key_path=opts.path,
        webhook=webhook,
        token=token,
        identity=identity,
        webhook_ca=webhook_ca,
    )
