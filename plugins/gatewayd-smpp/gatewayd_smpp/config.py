"""The ``[transports.NAME]`` keys of the smpp transport, read and checked at start.

Every error names its key path; the password stays a :class:`SecretRef` until the
transport binds, and is never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gatewayd.api import Options, SecretRef, TransportSettings

POLICIES = ("auto", "ucs2")
PART_ACKS = ("after_store", "on_arrival")
BIND_MODES = ("transceiver", "split")
MT_FIELDS = ("short_message", "message_payload")
ID_FORMATS = ("auto", "string", "decimal", "hex")


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    """An SMPP address with its type of number and numbering plan indicator."""

    addr: str
    ton: int
    npi: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SmppConfig:
    """Connection, keepalive, flow control, coding and receipt settings."""

    host: str
    port: int
    system_id: str
    password: SecretRef = field(repr=False)
    system_type: str
    source: Address
    dest_ton: int
    dest_npi: int
    enquire_link: float
    response_timeout: float
    connect_timeout: float
    reconnect_initial: float
    reconnect_max: float
    window: int
    throttle_backoff: float
    throttle_retries: int
    data_coding: str
    receipts: bool
    receipt_timeout: float
    part_timeout: float
    part_ack: str
    mo_dedup_window: float
    binds: int
    bind_mode: str
    mt_field: str
    max_rate: float
    submit_id_format: str
    receipt_id_format: str
    tls: bool
    tls_credentials: str | None
    tls_server_name: str | None

    @classmethod
    def from_settings(cls, settings: TransportSettings) -> SmppConfig:
        """Read and check every key; raise :class:`ConfigError` naming the first bad one."""
        opts = settings.options
        host = opts.get_str("host")
        port = opts.get_int("port", 2775, minimum=1, maximum=65535)
        system_id = _limited(opts, "system_id", 15, required=True)
        password = opts.secret("password")
        assert password is not None  # required=True: a missing key raised already
        system_type = _limited(opts, "system_type", 12, required=False)
        source = Address(
            addr=_limited(opts, "source_addr", 20, required=True),
            ton=_octet(opts, "source_addr_ton", 0),
            npi=_octet(opts, "source_addr_npi", 0),
        )
        config = cls(
            host=host,
            port=port,
            system_id=system_id,
            password=password,
            system_type=system_type,
            source=source,
            dest_ton=_octet(opts, "dest_addr_ton", 1),
            dest_npi=_octet(opts, "dest_addr_npi", 1),
            enquire_link=opts.get_float("enquire_link", 30.0, minimum=0.1),
            response_timeout=opts.get_float("response_timeout", 10.0, minimum=0.01),
            connect_timeout=opts.get_float("connect_timeout", 10.0, minimum=0.01),
            reconnect_initial=opts.get_float("reconnect_initial", 1.0, minimum=0.01),
            reconnect_max=opts.get_float("reconnect_max", 60.0, minimum=0.01),
            window=opts.get_int("window", 10, minimum=1),
            throttle_backoff=opts.get_float("throttle_backoff", 1.0, minimum=0.0),
            throttle_retries=opts.get_int("throttle_retries", 3, minimum=0),
            data_coding=opts.get_choice("data_coding", POLICIES, "auto"),
            receipts=opts.get_bool("receipts", True),
            receipt_timeout=opts.get_float("receipt_timeout", 600.0, minimum=0.01),
            part_timeout=opts.get_float("part_timeout", 30.0, minimum=0.01),
            part_ack=opts.get_choice("part_ack", PART_ACKS, "after_store"),
            mo_dedup_window=opts.get_float("mo_dedup_window", 300.0, minimum=0.0),
            binds=opts.get_int("binds", 1, minimum=1, maximum=32),
            bind_mode=opts.get_choice("bind_mode", BIND_MODES, "transceiver"),
            mt_field=opts.get_choice("mt_field", MT_FIELDS, "short_message"),
            max_rate=opts.get_float("max_rate", 0.0, minimum=0.0),
            submit_id_format=opts.get_choice("submit_id_format", ID_FORMATS, "auto"),
            receipt_id_format=opts.get_choice("receipt_id_format", ID_FORMATS, "auto"),
            tls=opts.get_bool("tls", False),
            tls_credentials=opts.get_str("tls_credentials", None),
            tls_server_name=opts.get_str("tls_server_name", None),
        )
        opts.check_unknown()
        if config.reconnect_max < config.reconnect_initial:
            raise opts.error("reconnect_max", "must be at least reconnect_initial")
        if config.tls_credentials is not None and not config.tls:
            raise opts.error("tls_credentials", "needs tls = true")
        for i, device in enumerate(settings.devices):
            dev = settings.device_options(i)
            if not _is_msisdn(device.name):
                raise dev.error(
                    "device",
                    f"expected an MSISDN in international form, digits only, got {device.name!r}",
                )
            dev.check_unknown()
        return config


def _limited(opts: Options, name: str, limit: int, *, required: bool) -> str:
    value = opts.get_str(name) if required else opts.get_str(name, "")
    if not value.isascii() or len(value) > limit:
        raise opts.error(name, f"expected at most {limit} ASCII characters (SMPP 3.4)")
    return value


def _octet(opts: Options, name: str, default: int) -> int:
    return opts.get_int(name, default, maximum=255)


def _is_msisdn(name: str) -> bool:
    # Digits only, E.164 length: source_addr arrives with or without "+", normalised.
    return name.isascii() and name.isdigit() and len(name) <= 15
