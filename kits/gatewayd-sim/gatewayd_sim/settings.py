"""Settings of the reference MSGin5G Server, read from a TOML file (see conf/sim.example.toml).

Key material is loaded into memory at load time (keys are files; a key's passphrase is a
secret reference), so :class:`SimSettings` can equally be built in a test from
certificates made with :mod:`gatewayd.pki`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gatewayd import config
from gatewayd.api import TlsIdentity, TrustAnchors
from gatewayd.errors import ConfigError, CredentialError
from gatewayd.listener import ListenerLimits, read_limits
from gatewayd.msgin5g import GatewayType
from gatewayd.options import Options, is_loopback
from gatewayd.security.tokens import TokenIssuer
from gatewayd_sim.policy import AllowList, GatewayPolicy, ServiceIdPattern
from gatewayd_sim.tokens import GATEWAY_SCOPES, SimTokens, TokenClient

DEFAULT_AS_ADDRESS = "as.sim.msgin5g"


# The operator interface serves a person or a test script on this host.
API_LIMITS = ListenerLimits()
OPERATOR_LIMITS = ListenerLimits(max_connections=64)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimSettings:
    """Everything the server needs; ``port``/``operator_port`` 0 pick free ports.

    ``identity`` is what the server's API presents (serverAuth); ``client_identity`` is
    what the server presents when it calls a gateway (clientAuth; its primary identity is
    the one gateways allow, ``api.allowed_peers``). Two certificates, so that neither can
    act in the other's role. ``operator_port`` ``None`` disables the operator interface.
    ``api_root`` overrides the advertised ``https://host:port`` (used in ``Location``
    headers).
    """

    identity: TlsIdentity
    client_identity: TlsIdentity
    trust: TrustAnchors
    allow: AllowList
    host: str = "127.0.0.1"
    port: int = 0
    api_root: str | None = None
    max_ttl: float = 3600.0
    operator_host: str = "127.0.0.1"
    operator_port: int | None = 0
    as_address: str = DEFAULT_AS_ADDRESS
    report_delay: float = 0.0
    tokens: SimTokens | None = None  # None: no token endpoint, MSGS calls need no token
    # idle/header timeouts and connection caps of the API and the operator interface
    limits: ListenerLimits = API_LIMITS
    operator_limits: ListenerLimits = OPERATOR_LIMITS


def gateway(identity: str, gw_type: str, service_ids: tuple[str, ...]) -> GatewayPolicy:
    """An allow-list entry from plain values (patterns as in the TOML file)."""
    return GatewayPolicy(
        identity=identity,
        gw_type=gw_type,
        service_ids=tuple(ServiceIdPattern.parse(text) for text in service_ids),
    )


def load(path: Path) -> SimSettings:
    """Read and check a TOML settings file; every error names the key path."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("-", f"cannot read {path}: {exc.strerror}", source=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("-", f"not valid TOML: {exc}", source=str(path)) from None
    base = config.base_dir(path)
    root = Options(data, "", source=str(path), base=base)

    listen = root.table("listen")
    host = listen.get_str("host", "127.0.0.1")
    port = listen.get_int("port", 0)
    api_root = listen.get_str("api_root", None)
    limits = read_limits(listen, API_LIMITS)
    listen.check_unknown()

    tls = root.table("tls", required=True)
    identity = _identity(tls, base)
    client_identity = _client_identity(tls, base)
    trust = _trust(tls, base)
    tls.check_unknown()

    registration = root.table("registration")
    max_ttl = registration.get_float("max_ttl", 3600.0, minimum=1.0)
    registration.check_unknown()

    operator = root.table("operator")
    operator_host = operator.get_str("host", "127.0.0.1")
    if not is_loopback(operator_host):
        # The operator interface is plain HTTP without authentication: loopback only.
        raise operator.error(
            "host", "must be a loopback address (the interface is unauthenticated)"
        )
    operator_port: int | None = operator.get_int("port", 0)
    if not operator.get_bool("enabled", True):
        operator_port = None
    operator_limits = read_limits(operator, OPERATOR_LIMITS)
    operator.check_unknown()

    downlink = root.table("downlink")
    as_address = downlink.get_str("default_from", DEFAULT_AS_ADDRESS)
    report_delay = downlink.get_float("report_delay", 0.0)
    downlink.check_unknown()

    entries = []
    for table in root.tables("gateways"):
        identity_id = table.get_str("identity")
        gw_type = table.get_choice("type", tuple(t.value for t in GatewayType))
        patterns = table.get_str_list("service_ids")
        if not patterns:
            raise table.error("service_ids", "must list at least one service id or pattern")
        try:
            entries.append(gateway(identity_id, gw_type, patterns))
        except ValueError as exc:
            raise table.error("service_ids", str(exc)) from None
        table.check_unknown()
    tokens = _tokens(root.table("tokens"), base) if "tokens" in root else None
    root.check_unknown()
    return SimSettings(
        identity=identity,
        client_identity=client_identity,
        trust=trust,
        allow=AllowList(tuple(entries)),
        host=host,
        port=port,
        api_root=api_root,
        max_ttl=max_ttl,
        operator_host=operator_host,
        operator_port=operator_port,
        as_address=as_address,
        report_delay=report_delay,
        tokens=tokens,
        limits=limits,
        operator_limits=operator_limits,
    )


def _tokens(table: Options, base: Path) -> SimTokens:
    """``[tokens]`` and its ``[[tokens.clients]]``; keys are files, secrets references."""
    issuer = table.get_str("issuer")
    key_pem = _private_key(table, "key", "key_passphrase", base)
    clients = []
    for entry in table.tables("clients"):
        secret = entry.secret("secret", required=False)
        public_key = _read(entry, "public_key", base, required=False) or None
        if secret is None and public_key is None:
            raise entry.error("secret", "give a secret (client_secret_basic) or public_key")
        clients.append(
            TokenClient(
                client_id=entry.get_str("id"),
                secret=secret,
                public_key_pem=public_key,
                algorithm=entry.get_choice("algorithm", ("ES256", "RS256"), "ES256"),
                scopes=entry.get_str_list("scopes", GATEWAY_SCOPES),
            )
        )
        entry.check_unknown()
    algorithm = table.get_choice("algorithm", ("ES256", "RS256", "PS256", "EdDSA"), "ES256")
    try:
        TokenIssuer(issuer=issuer, key_pem=key_pem, algorithm=algorithm)  # key fits algorithm?
    except ConfigError as exc:
        raise table.error("algorithm", exc.problem) from None
    tokens = SimTokens(
        issuer=issuer,
        key_pem=key_pem,
        algorithm=algorithm,
        key_id=table.get_str("key_id", None),
        ttl=table.get_float("ttl", 300.0, minimum=10.0),
        required=table.get_bool("required", True),
        audiences=table.get_str_list("audience", ()),
        leeway=table.get_float("leeway", 30.0),
        clients=tuple(clients),
    )
    table.check_unknown()
    return tokens


def _identity(tls: Options, base: Path) -> TlsIdentity:
    cert = _read(tls, "cert", base)
    return TlsIdentity(
        cert_chain_pem=cert, key_pem=_private_key(tls, "key", "key_passphrase", base)
    )


def _client_identity(tls: Options, base: Path) -> TlsIdentity:
    """``client_cert``/``client_key``: required, never the serving certificate by default.

    A gateway refuses a client certificate without clientAuth in the handshake, so a
    certificate that lacks it is refused here, naming the key, instead of failing every
    push later.
    """
    for name in ("client_cert", "client_key"):
        if name not in tls:
            raise tls.error(
                name,
                "is required: the certificate (and key) the server presents when it calls "
                "gateways, with clientAuth (`gatewayd pki init` writes server-client.pem "
                "and server-client.key)",
            )
    cert = _read(tls, "client_cert", base)
    try:
        leaf = x509.load_pem_x509_certificate(cert)
    except ValueError as exc:
        raise tls.error("client_cert", f"not a PEM certificate: {exc}") from None
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None  # no EKU: fit for any purpose
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise tls.error(
            "client_cert",
            "has no clientAuth extended key usage, so gateways refuse it as a TLS client "
            "(a serving certificate will not do)",
        )
    return TlsIdentity(
        cert_chain_pem=cert,
        key_pem=_private_key(tls, "client_key", "client_key_passphrase", base),
    )


def _private_key(options: Options, name: str, passphrase_name: str, base: Path) -> bytes:
    """A PEM private key file, decrypted in memory and re-serialised as plain PKCS#8."""
    key = _read(options, name, base)
    passphrase = options.secret(passphrase_name, required=False)
    try:
        loaded = serialization.load_pem_private_key(
            key, password=passphrase.read_bytes().rstrip(b"\r\n") if passphrase else None
        )
    except (ValueError, TypeError) as exc:
        # TypeError: encrypted without a passphrase, or a passphrase for a plain key.
        raise CredentialError(f"{options.key(name)}: cannot load the private key: {exc}") from None
    return loaded.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _trust(tls: Options, base: Path) -> TrustAnchors:
    ca = _read(tls, "ca", base)
    crl = _read(tls, "crl", base, required=False)
    return TrustAnchors(ca_pem=ca, crl_pem=(crl,) if crl else ())


def _read(options: Options, name: str, base: Path, *, required: bool = True) -> bytes:
    path = (
        options.get_path(name, base=base) if required else options.get_path(name, None, base=base)
    )
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise options.error(name, f"cannot read {path}: {exc.strerror}") from None
