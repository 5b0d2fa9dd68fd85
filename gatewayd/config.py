"""The gateway's TOML configuration, validated into frozen settings.

Every error names the file, the key path and what was expected; a secret can only be
given by reference. Plugin tables (``[credentials.*]``, ``[transports.*]``) are checked
here for their common keys and handed to the plugins for the rest.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gatewayd.api import Device, Options, PluginSettings, TransportSettings
from gatewayd.errors import ConfigError
from gatewayd.listener import ListenerLimits, read_limits
from gatewayd.msgin5g.model import Address
from gatewayd.msgin5g.registration import GatewayType
from gatewayd.northbound.paths import gateway_api_prefix
from gatewayd.options import ListenAddress, SecretRef, is_loopback
from gatewayd.retry import RetryPolicy
from gatewayd.security.tokens import TokenGate, read_gate
from gatewayd.store import StoreSettings

# Listener defaults: one caller (the server, with a pooled client) for the API, a few
# scrapers for the metrics; the device transports take gatewayd.listener's 1024.
API_LIMITS = ListenerLimits(max_connections=256)
METRICS_LIMITS = ListenerLimits(max_connections=64)
# transports.NAME.pipeline: how many of one device's messages may be in flight at once.
MAX_PIPELINE = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class NorthboundSettings:
    """The MSGin5G Server we call, and how we prove who we are to it."""

    api_root: str  # the server's apiRoot, e.g. https://m5s.example:8443
    credentials: str  # backend with our TLS identity and the CAs that vouch for the server
    server_name: str  # the host name the server's certificate must carry (DNS SAN)
    # The server's identity (its NF instance URN, say): the primary identity (first URI
    # SAN, else first DNS SAN) its certificate must have. Required: the host name alone
    # is shared by every certificate a CA issued for that host (docs/security.md).
    server_identity: str
    token: str | None  # backend issuing OAuth 2.0 bearer tokens, if the server wants them
    token_scope: str
    registration_ttl: float
    timeout: float
    max_connections: int
    concurrency: int  # uplink/report requests in flight at once


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSettings:
    """Our MSGG_N3GDelivery / MSGG_L3GDelivery server, which the MSGin5G Server calls."""

    host: str
    port: int
    advertise: str | None  # the apiRoot we register; None: https://<listen address>
    credentials: str  # backend with our server identity and the CAs for client certs
    allowed_peers: tuple[str, ...]  # server identities (URI or DNS SAN) that may call us
    max_body: int
    token: TokenGate | None = None  # [api.token]: the bearer token the server must present
    limits: ListenerLimits = API_LIMITS  # idle/header timeouts, connection cap


@dataclass(frozen=True, slots=True, kw_only=True)
class RelaySettings:
    default_destination: Address | None
    reply_route_ttl: float
    max_payload: int  # bytes of payload per MSGin5G segment (TS 23.554 8.5.1: 2048 default)
    max_segments: int  # most segments per message, either way
    reassembly_timeout: float  # seconds a downlink message's segments wait for the rest


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    """The optional Prometheus endpoint (``[metrics]``); absent means no listener."""

    host: str
    port: int
    allow_remote: bool  # a non-loopback listen address must be asked for explicitly
    limits: ListenerLimits = METRICS_LIMITS

    @property
    def devices_port(self) -> int:
        """Where the devices part of a two-process gateway listens: the next port
        (0, any free port, stays 0)."""
        return self.port + 1 if self.port else 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    level: str
    format: str  # auto | json | console


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    source: Path
    gateway_id: str
    gateway_type: GatewayType
    state_dir: Path
    northbound: NorthboundSettings
    api: ApiSettings
    store: StoreSettings
    retry: RetryPolicy
    relay: RelaySettings
    log: LogSettings
    drain_timeout: float
    credentials: tuple[PluginSettings, ...]
    transports: tuple[TransportSettings, ...]
    # Defaults keep Settings(...) calls elsewhere working without these keys.
    metrics: MetricsSettings | None = None
    cert_warning_days: int = 30  # warn (credentials.expiring) this close to a cert's end
    stats_interval: float = 300.0  # seconds between gateway.stats log lines; 0: none
    processes: int = 1  # 2: the northbound side and the devices side apart (processes.py)

    def credential(self, name: str) -> PluginSettings | None:
        return next((c for c in self.credentials if c.name == name), None)


def load(path: Path) -> Settings:
    """Read and validate a config file; raise :class:`ConfigError` naming the key."""
    source = str(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("-", "file not found", source=source) from None
    except OSError as exc:
        raise ConfigError("-", f"cannot read: {exc.strerror}", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("-", f"not valid TOML: {exc}", source=source) from None
    return parse(data, path)


def base_dir(path: Path) -> Path:
    """The folder relative paths in the config file ``path`` are taken from: its own."""
    return path.parent.resolve()


def parse(data: dict[str, Any], path: Path) -> Settings:
    base = base_dir(path)
    root = Options(data, "", source=str(path), base=base)

    gw = root.table("gateway", required=True)
    gateway_id = gw.get_str("id")
    gateway_type = GatewayType(gw.get_choice("type", tuple(GatewayType)))
    state_dir = gw.get_path("state_dir", None, base=base) or base / "state"
    drain_timeout = gw.get_float("drain_timeout", 10.0)
    cert_warning_days = gw.get_int("cert_warning_days", 30, minimum=0)
    stats_interval, processes = (
        gw.get_float("stats_interval", 300.0, minimum=0.0),
        _processes(gw, data.get("store")),
    )
    gw.check_unknown()

    credentials = tuple(
        _plugin_settings(opts, name, base) for name, opts in _named_tables(root, "credentials")
    )
    cred_names = {c.name for c in credentials}

    def credential_ref(opts: Options, key: str, default: str | None = None) -> str:
        name = opts.get_str(key, default)
        if name is None:
            raise opts.error(key, "is required (the name of a [credentials.NAME] table)")
        if name not in cred_names:
            known = ", ".join(sorted(cred_names)) or "none"
            raise opts.error(key, f"no [credentials.{name}] table (defined: {known})")
        return name

    nb = root.table("northbound", required=True)
    api_root = nb.get_str("api_root").rstrip("/")
    parts = urlsplit(api_root)
    if parts.scheme != "https" or not parts.hostname:
        raise nb.error("api_root", f"expected an https:// URL, got {api_root!r}")
    token = nb.get_str("token", None)
    if token is not None and token not in cred_names:
        raise nb.error("token", f"no [credentials.{token}] table")
    server_identity = nb.get_str("server_identity", None)
    if not server_identity:
        raise nb.error(
            "server_identity",
            "is required: the identity (first URI SAN, else DNS SAN) the MSGin5G Server's "
            "certificate must carry, e.g. its NF instance URN; the host name alone is not "
            "enough, any certificate issued for that host would pass",
        )
    northbound = NorthboundSettings(
        api_root=api_root,
        credentials=credential_ref(nb, "credentials"),
        server_name=nb.get_str("server_name", parts.hostname),
        server_identity=server_identity,
        token=token,
        token_scope=nb.get_str("token_scope", "msgs-msgdelivery msgs-gwregistration"),
        registration_ttl=nb.get_float("registration_ttl", 3600.0, minimum=10.0),
        timeout=nb.get_float("timeout", 10.0, minimum=0.1),
        max_connections=nb.get_int("max_connections", 8, minimum=1),
        concurrency=nb.get_int("concurrency", 64, minimum=1),
    )
    nb.check_unknown()

    api_opts = root.table("api", required=True)
    listen = api_opts.get_listen("listen")
    host, port = listen.host, listen.port
    advertise = api_opts.get_str("advertise", None)
    if advertise is None and host in ("0.0.0.0", "::"):  # noqa: S104 - checking, not binding
        raise api_opts.error("advertise", "is required when listening on all addresses")
    api = ApiSettings(
        host=host,
        port=port,
        advertise=advertise.rstrip("/") if advertise else None,
        credentials=credential_ref(api_opts, "credentials", northbound.credentials),
        allowed_peers=_allowed_peers(api_opts, northbound.server_identity),
        max_body=api_opts.get_int("max_body", 64 * 1024, minimum=1024),
        limits=read_limits(api_opts, API_LIMITS),
        token=read_gate(
            api_opts.table("token"),
            default_audience=gateway_id,
            # The MSGG API we serve is the scope a caller needs (msgg-n3gdelivery, ...).
            default_scope=gateway_api_prefix(gateway_type).split("/")[1],
            base=base,
        )
        if "token" in api_opts
        else None,
    )
    api_opts.check_unknown()

    store = _store(root.table("store"), state_dir, base)
    retry = _retry(root.table("retry"))
    relay = _relay(root.table("relay"))
    log = _log(root.table("log"))
    metrics = _metrics(root.table("metrics"))

    transports = tuple(
        _transport_settings(opts, name, base) for name, opts in _named_tables(root, "transports")
    )
    if not transports:
        raise root.error("transports", "at least one [transports.NAME] table is required")
    _check_unique_service_ids(transports, str(path))
    root.check_unknown()

    return Settings(
        source=path,
        gateway_id=gateway_id,
        gateway_type=gateway_type,
        state_dir=state_dir,
        northbound=northbound,
        api=api,
        store=store,
        retry=retry,
        relay=relay,
        log=log,
        drain_timeout=drain_timeout,
        credentials=credentials,
        transports=transports,
        metrics=metrics,
        cert_warning_days=cert_warning_days,
        stats_interval=stats_interval,
        processes=processes,
    )


def _processes(gw: Options, store: Any) -> int:
    processes = gw.get_int("processes", 1, minimum=1, maximum=2)
    backend = store.get("backend", "sqlite") if isinstance(store, dict) else "sqlite"
    if processes > 1 and backend != "sqlite":
        # PostgreSQL shares by leasing lanes among whole instances (docs/scaling.md).
        raise gw.error(
            "processes",
            "splits one gateway over one SQLite file; with the PostgreSQL store, run "
            "several instances instead (docs/scaling.md)",
        )
    return processes


def _allowed_peers(api: Options, server_identity: str) -> tuple[str, ...]:
    # Default: only the server we register with may call us, by the same identity we
    # demand of it. An explicit empty list would lock everyone out (or, read loosely,
    # let everyone in): refuse it rather than guess.
    peers = api.get_str_list("allowed_peers", (server_identity,))
    if not peers or not all(peers):
        raise api.error(
            "allowed_peers",
            "must list at least one identity (first URI SAN, else DNS SAN of a caller's "
            "certificate); leave it out to allow northbound.server_identity only",
        )
    return peers


def _metrics(mt: Options) -> MetricsSettings | None:
    listen = mt.get_listen("listen", None)
    allow_remote = mt.get_bool("allow_remote", False)
    limits = read_limits(mt, METRICS_LIMITS)
    mt.check_unknown()
    if listen is None:
        return None
    # The endpoint has no authentication: exposing it beyond this host is opt-in.
    if not allow_remote and not listen.is_loopback:
        raise mt.error(
            "listen",
            f"{listen.host!r} is not a loopback address; set allow_remote = true to expose it",
        )
    return MetricsSettings(
        host=listen.host, port=listen.port, allow_remote=allow_remote, limits=limits
    )


def _store(st: Options, state_dir: Path, base: Path) -> StoreSettings:
    backend = st.get_choice("backend", ("sqlite", "postgresql"), "sqlite")
    shared: dict[str, Any] = {}
    if backend == "postgresql":
        shared = {
            "dsn": _database_dsn(st),
            "password": st.secret("password", required=False),
            "lease": st.get_float("lease", 30.0, minimum=1.0),
            "pool_size": st.get_int("pool_size", 4, minimum=1),
        }
    store = StoreSettings(
        path=st.get_path("path", state_dir / "gatewayd.db", base=base),
        synchronous=st.get_choice("synchronous", ("full", "normal"), "full"),  # type: ignore[arg-type]
        max_messages=st.get_int("max_messages", 100_000, minimum=1),
        max_bytes=st.get_int("max_bytes", 256 * 1024 * 1024, minimum=1024),
        max_age=st.get_float("max_age", 7 * 86400.0, minimum=1.0),
        dedup_window=st.get_float("dedup_window", 86400.0, minimum=0.0),
        backend=backend,  # type: ignore[arg-type]
        **shared,
    )
    st.check_unknown()
    return store


def _database_dsn(st: Options) -> str:
    """``store.dsn``: a libpq URI or key/value string, without a password (that goes in
    ``store.password``, by reference), verifying the server's certificate and name
    unless the database is on this host."""
    dsn = st.get_str("dsn")
    try:
        from psycopg.conninfo import conninfo_to_dict  # the postgresql extra
    except ImportError:
        raise st.error(
            "backend", "postgresql needs the postgresql extra: pip install 'gatewayd[postgresql]'"
        ) from None
    try:
        parts = conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg's parser: ProgrammingError with its reason
        raise st.error("dsn", f"not a PostgreSQL connection string: {exc}") from None
    if parts.get("password"):
        raise st.error("dsn", "must not hold a password; give store.password by reference")
    host = str(parts.get("host") or "")
    local = not host or host.startswith("/") or all(is_loopback(h) for h in host.split(","))
    if not local and parts.get("sslmode") != "verify-full":
        raise st.error(
            "dsn",
            f"the database at {host} is reached over the network: add sslmode=verify-full"
            " (and sslrootcert=...) so its certificate and name are checked",
        )
    return dsn


def _retry(rt: Options) -> RetryPolicy:
    retry = RetryPolicy(
        initial=rt.get_float("initial", 1.0, minimum=0.01),
        maximum=rt.get_float("maximum", 300.0, minimum=0.01),
        multiplier=rt.get_float("multiplier", 2.0, minimum=1.0),
        jitter=rt.get_float("jitter", 0.2),
    )
    rt.check_unknown()
    return retry


def _relay(rl: Options) -> RelaySettings:
    dest = rl.table("default_destination")
    relay = RelaySettings(
        default_destination=Address(dest.get_str("addrType"), dest.get_str("addr"))
        if "addr" in dest or "addrType" in dest
        else None,
        reply_route_ttl=rl.get_float("reply_route_ttl", 86400.0),
        max_payload=rl.get_int("max_payload", 2048, minimum=1),
        max_segments=rl.get_int("max_segments", 32, minimum=1),
        reassembly_timeout=rl.get_float("reassembly_timeout", 120.0, minimum=0.1),
    )
    dest.check_unknown()
    rl.check_unknown()
    return relay


def _log(lg: Options) -> LogSettings:
    log = LogSettings(
        level=lg.get_choice("level", ("debug", "info", "warning", "error"), "info"),
        format=lg.get_choice("format", ("auto", "json", "console"), "auto"),
    )
    lg.check_unknown()
    return log


def _named_tables(root: Options, key: str) -> list[tuple[str, Options]]:
    group = root.table(key)
    return [(name, group.table(name, required=True)) for name in list(group.raw())]


def _plugin_settings(opts: Options, name: str, base: Path) -> PluginSettings:
    plugin = opts.get_str("plugin")
    rest = {k: v for k, v in opts.raw().items() if k != "plugin"}
    return PluginSettings(name=name, plugin=plugin, options=opts.narrowed(rest), base_dir=base)


def _transport_settings(opts: Options, name: str, base: Path) -> TransportSettings:
    plugin = opts.get_str("plugin")
    template = opts.get_str("service_id_template", None)
    if template is not None and "{device}" not in template:
        raise opts.error("service_id_template", 'must contain "{device}"')
    devices = []
    seen: set[str] = set()
    for dev in opts.tables("devices"):
        device = Device(
            name=dev.get_str("device"),
            service_id=dev.get_str("service_id"),
            options={k: v for k, v in dev.raw().items() if k not in ("device", "service_id")},
        )
        if device.name in seen:
            raise dev.error("device", f"device {device.name!r} is listed twice")
        seen.add(device.name)
        devices.append(device)
    # Above 1, one device's messages may overtake each other (gatewayd.envelope.device_lane).
    pipeline = opts.get_int("pipeline", 1, minimum=1, maximum=MAX_PIPELINE)
    common = ("plugin", "service_id_template", "devices", "pipeline")
    rest = {k: v for k, v in opts.raw().items() if k not in common}
    return TransportSettings(
        name=name,
        plugin=plugin,
        options=opts.narrowed(rest),
        base_dir=base,
        devices=tuple(devices),
        service_id_template=template,
        pipeline=pipeline,
    )


def _check_unique_service_ids(transports: tuple[TransportSettings, ...], source: str) -> None:
    owner: dict[str, str] = {}
    for t in transports:
        for d in t.devices:
            if d.service_id in owner:
                raise ConfigError(
                    f"transports.{t.name}.devices",
                    f"service_id {d.service_id!r} is already mapped in {owner[d.service_id]}",
                    source=source,
                )
            owner[d.service_id] = f"transports.{t.name}"


# --- what check-config verifies beyond parsing ----------------------------------------


def read_raw(path: Path) -> dict[str, Any]:
    """The file as parsed TOML, unvalidated (after :func:`load` accepted it)."""
    with path.open("rb") as fh:
        return tomllib.load(fh)


def changed_tables(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Which tables differ: top-level ones, and ``transports.NAME`` /
    ``credentials.NAME`` one by one (what an operator would have to look at)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if (
            key in ("transports", "credentials")
            and isinstance(before, dict)
            and isinstance(after, dict)
        ):
            changed += [
                f"{key}.{name}"
                for name in sorted(set(before) | set(after))
                if before.get(name) != after.get(name)
            ]
        elif before != after:
            changed.append(key)
    return changed


def secret_refs(settings: Settings) -> list[SecretRef]:
    """Every ``{ env | file | credential = ... }`` reference in the file, wherever it is
    (plugin tables included), each named by its key path."""
    data = read_raw(settings.source)
    base = base_dir(settings.source)
    found: list[SecretRef] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            if len(value) == 1:
                ((kind, where),) = value.items()
                if kind in ("env", "file", "credential") and isinstance(where, str):
                    found.append(SecretRef.at(kind, where, key, base=base))
                    return
            for name, inner in value.items():
                walk(inner, f"{key}.{name}" if key else name)
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                walk(inner, f"{key}[{i}]")

    walk(data, "")
    return found


def listen_addresses(settings: Settings) -> list[tuple[str, ListenAddress]]:
    """Every address the gateway will listen on, by config key: the API, the metrics
    listener (and the devices part's next to it, with ``gateway.processes = 2``), and
    each transport's ``listen`` option (the convention for listeners)."""
    out = [("api.listen", ListenAddress(settings.api.host, settings.api.port))]
    ms = settings.metrics
    if ms is not None:
        out.append(("metrics.listen", ListenAddress(ms.host, ms.port)))
        if settings.processes > 1:  # the devices part's admin listener
            out.append(("metrics.listen", ListenAddress(ms.host, ms.devices_port)))
    data = read_raw(settings.source)
    for name, table in data.get("transports", {}).items():
        if isinstance(table, dict) and isinstance(table.get("listen"), str):
            opts = Options(table, f"transports.{name}", source=str(settings.source))
            out.append((f"transports.{name}.listen", opts.get_listen("listen")))
    return out
