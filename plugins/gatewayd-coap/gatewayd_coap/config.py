"""The ``[transports.NAME]`` keys of the coap transport, read once at construction.

Secrets (OSCORE master secrets) stay :class:`SecretRef` until the transport starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gatewayd.api import ConfigError, Options, SecretRef, TransportSettings, is_loopback

DEFAULT_PORT = 5683  # RFC 7252 12.6

# AEAD algorithms aiocoap's OSCORE implements, by COSE name, with their nonce length:
# RFC 8613 3.3 limits a Sender/Recipient ID to nonce length - 6 bytes. The first is
# OSCORE's mandatory-to-implement default (RFC 8613 3.2.1).
NONCE_BYTES = {
    "AES-CCM-16-64-128": 13,
    "AES-CCM-16-128-128": 13,
    "A128GCM": 12,
    "A256GCM": 12,
    "ChaCha20/Poly1305": 12,
}
ALGORITHMS = tuple(NONCE_BYTES)
HKDF = {"SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512"}
MIN_SECRET_BYTES = 16  # RFC 8613 12.3: a random secret of at least the key length


@dataclass(frozen=True, slots=True, kw_only=True)
class OscoreConfig:
    """One device's OSCORE security context parameters (RFC 8613 3.2), as the gateway
    sees them: ``sender_id`` is the gateway's ID, ``recipient_id`` the device's."""

    master_secret: SecretRef = field(repr=False)
    master_salt: bytes
    sender_id: bytes
    recipient_id: bytes
    algorithm: str
    hkdf: str  # aiocoap's name of the hash: "sha256", ...
    replay_window: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CoapConfig:
    host: str
    port: int
    max_body: int
    delivery_timeout: float
    endpoints: dict[str, str]  # device name -> coap:// URI of its inbox
    oscore: dict[str, OscoreConfig]  # device name -> its security context
    # Every device authenticates (each listed one has a context, none is admitted
    # unlisted): an unprotected request is refused whatever name it gives.
    oscore_only: bool


def read_config(settings: TransportSettings) -> CoapConfig:
    opts = settings.options
    listen = opts.get_listen("listen", None)
    host, port = (listen.host, listen.port) if listen else ("127.0.0.1", DEFAULT_PORT)
    max_body = opts.get_int("max_body", 1024, minimum=64)
    delivery_timeout = opts.get_float("delivery_timeout", 30.0, minimum=0.1)
    opts.check_unknown()
    endpoints: dict[str, str] = {}
    oscore: dict[str, OscoreConfig] = {}
    kids: dict[bytes, str] = {}
    for i, device in enumerate(settings.devices):
        dopts = settings.device_options(i)
        if "oscore" in dopts:
            sub = dopts.table("oscore")
            context = _oscore(sub)
            # The server finds a request's context by the device's ID (the OSCORE
            # 'kid'), so two devices with one ID would be one identity.
            other = kids.setdefault(context.recipient_id, device.name)
            if other != device.name:
                raise sub.error("recipient_id", f"the same as device {other!r}'s")
            oscore[device.name] = context
        endpoint = dopts.get_str("endpoint", None)
        if endpoint is not None:
            endpoints[device.name] = _endpoint(dopts, endpoint, device.name in oscore)
        dopts.check_unknown()
    # Without OSCORE a device is whoever claims its name, and every byte is readable:
    # such a device must stay on this host. So another address is only for a transport
    # on which every device authenticates: every listed device has a context and none
    # is admitted unlisted (service_id_template), which would be unauthenticated.
    plain = [d.name for d in settings.devices if d.name not in oscore]
    oscore_only = bool(oscore) and not plain and settings.service_id_template is None
    if not oscore_only and not is_loopback(host):
        who = (
            f"device {plain[0]!r} has no [oscore] context"
            if plain
            else "unlisted devices (service_id_template) cannot have an OSCORE context"
            if settings.devices
            else "no device has an OSCORE context"
        )
        raise opts.error(
            "listen",
            f"{host} is not a loopback address and {who}; plain CoAP is not authenticated, "
            "so this transport only listens beyond loopback when every device uses OSCORE",
        )
    return CoapConfig(
        host=host,
        port=port,
        max_body=max_body,
        delivery_timeout=delivery_timeout,
        endpoints=endpoints,
        oscore=oscore,
        oscore_only=oscore_only,
    )


def _endpoint(opts: Options, uri: str, protected: bool) -> str:
    parts = urlsplit(uri)
    if parts.scheme != "coap" or not parts.hostname:
        raise opts.error("endpoint", f"expected a coap:// URI, got {uri!r}")
    if not protected and not is_loopback(parts.hostname):
        raise opts.error(
            "endpoint",
            f"{parts.hostname} is not a loopback address; plain CoAP downlink stays on this "
            "host (give the device an [oscore] context to reach it elsewhere)",
        )
    return uri


def _oscore(opts: Options) -> OscoreConfig:
    secret = opts.secret("master_secret")
    assert secret is not None  # required=True
    algorithm = opts.get_choice("algorithm", ALGORITHMS, ALGORITHMS[0])
    hkdf = opts.get_choice("hkdf", tuple(HKDF), "SHA-256")
    config = OscoreConfig(
        master_secret=secret,
        master_salt=_hex(opts, "master_salt", "", limit=64),
        sender_id=_hex(opts, "sender_id", None, limit=NONCE_BYTES[algorithm] - 6),
        recipient_id=_hex(opts, "recipient_id", None, limit=NONCE_BYTES[algorithm] - 6),
        algorithm=algorithm,
        hkdf=HKDF[hkdf],
        replay_window=opts.get_int("replay_window", 32, minimum=1),
    )
    if config.sender_id == config.recipient_id:
        # RFC 8613 3.3: the two IDs of one context must differ, or the two directions
        # would share a key and a nonce space.
        raise opts.error("recipient_id", "must differ from sender_id")
    opts.check_unknown()
    return config


def _hex(opts: Options, name: str, default: str | None, *, limit: int) -> bytes:
    """A byte string written as hex (``""`` is the empty one, a valid OSCORE ID)."""
    text = opts.get_str(name) if default is None else opts.get_str(name, default)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise opts.error(name, f"expected hex digits, got {text!r}") from None
    if len(value) > limit:
        raise opts.error(name, f"at most {limit} bytes, got {len(value)}")
    return value


def read_master_secret(config: OscoreConfig) -> bytes:
    """The master secret its reference points to, given as hex (like RFC 8613's test
    vectors and aiocoap's ``secret_hex``); read at start, never logged."""
    text = config.master_secret.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(config.master_secret.key, "the secret is not hex digits") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            config.master_secret.key,
            f"the secret is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are required",
        )
    return secret
