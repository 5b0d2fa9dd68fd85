"""The public plugin API: everything a transport or credential plugin may import.

Plugins import from here and nowhere else in ``gatewayd`` (tests may also use
``gatewayd_testing``). What is not re-exported here may change without notice.

TLS contexts for device-side links are built with :func:`client_context` and
:func:`server_context`, so every plugin gets the same profile as the core (TLS 1.2+,
strict X.509 checks, security level 2, CRLs when given).

A plugin module declares hook implementations with :data:`hookimpl`; the hooks are
documented in :mod:`gatewayd.hookspecs`. Hooks only *register* classes: the message
path itself is plain typed async code on :class:`Transport` and
:class:`CredentialBackend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import pluggy
import structlog

from gatewayd.errors import (
    BacklogFullError,
    ConfigError,
    CredentialError,
    DeviceRefusedError,
    GatewaydError,
    IntakeRefusedError,
    InvalidMessageError,
    PluginError,
    UnknownDeviceError,
)
from gatewayd.listener import GuardedSite, ListenerLimits
from gatewayd.listener import read_limits as read_listener_limits
from gatewayd.listener import runner as listener_runner
from gatewayd.msgin5g.model import Address
from gatewayd.options import MISSING, ListenAddress, Options, SecretRef, is_loopback
from gatewayd.security.material import TlsIdentity, TrustAnchors
from gatewayd.security.tls import PeerIdentity, client_context, peer_identity, server_context

__all__ = [
    "API_VERSION",
    "API_VERSION_ATTRIBUTE",
    "MISSING",
    "Acceptance",
    "Address",
    "BacklogFullError",
    "ConfigError",
    "CredentialBackend",
    "CredentialError",
    "CredentialFactory",
    "DeliveryOutcome",
    "Device",
    "DeviceRefusedError",
    "DeviceReport",
    "Downlink",
    "GatewaydError",
    "GuardedSite",
    "IntakeRefusedError",
    "InvalidMessageError",
    "KeyValueStore",
    "ListenAddress",
    "ListenerLimits",
    "Logger",
    "ManagedTransport",
    "Options",
    "PeerIdentity",
    "PluginContext",
    "PluginError",
    "PluginSettings",
    "Registry",
    "Rejection",
    "SecretRef",
    "Signer",
    "TlsIdentity",
    "Transport",
    "TransportContext",
    "TransportFactory",
    "TransportSettings",
    "TrustAnchors",
    "UnknownDeviceError",
    "Uplink",
    "UplinkReport",
    "client_context",
    "hookimpl",
    "is_loopback",
    "listener_runner",
    "peer_identity",
    "read_listener_limits",
    "server_context",
]

API_VERSION = "1.0"
"""The plugin API this gatewayd offers, ``MAJOR.MINOR``. A minor release only adds; a
major one may change or remove. A plugin is loaded when it was written for the same
major version and a minor version no newer than this one."""

API_VERSION_ATTRIBUTE = "GATEWAYD_API_VERSION"
"""What a plugin's entry-point module sets to the API version it was written for, as a
literal (``GATEWAYD_API_VERSION = "1.0"``), not by importing :data:`API_VERSION`."""

hookimpl = pluggy.HookimplMarker("gatewayd")
"""Marks a plugin function as the implementation of a ``gatewayd_*`` hook."""

Logger = structlog.stdlib.BoundLogger


# --- devices and messages -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One device a transport serves, and the UE Service ID it has in MSGin5G.

    ``options`` holds the transport's own per-device keys from the config (a webhook
    URL, a token reference, ...), read with :class:`Options`.
    """

    name: str
    service_id: str
    options: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Uplink:
    """A message a device sent, as a transport hands it to the gateway.

    ``msg_id`` is the device's own id when its protocol has one: redeliveries with the
    same id are recognised and stored once. ``dest`` may be left out: the gateway then
    uses the reply route of the last message the device received, or the configured
    default destination.
    """

    device: str
    payload: str | None
    msg_id: str | None = None
    dest: Address | None = None
    app_id: str | None = None
    report_requested: bool = False
    expiry: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """Input a transport refuses for good, for :meth:`TransportContext.reject`.

    ``reason`` is a stable word for logs and metrics (``not_json``, ``oversize``, ...),
    ``detail`` says what to fix; ``content`` is the raw input, as received.
    """

    device: str
    reason: str
    detail: str
    content: bytes | str | None = field(default=None, repr=False)
    msg_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Acceptance:
    """The gateway has durably stored a message: only now may the transport ack it."""

    msg_id: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceReport:
    """A device's own, application-level report on a downlink message it received."""

    device: str
    msg_id: str
    delivered: bool
    cause: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Downlink:
    """A message for a device. ``origin`` is the MSGin5G party that sent it."""

    msg_id: str
    device: Device
    origin: Address
    payload: str | None
    app_id: str | None = None
    report_requested: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryOutcome:
    """What became of a :class:`Downlink`, from the transport's own evidence.

    A failure is ``permanent`` when retrying cannot help (the device's endpoint refused
    the message); otherwise the gateway retries with backoff until the message expires.
    """

    delivered: bool
    cause: str | None = None
    permanent: bool = False

    @classmethod
    def success(cls) -> DeliveryOutcome:
        return cls(delivered=True)

    @classmethod
    def failure(cls, cause: str, *, permanent: bool = False) -> DeliveryOutcome:
        return cls(delivered=False, cause=cause, permanent=permanent)


@dataclass(frozen=True, slots=True, kw_only=True)
class UplinkReport:
    """The server's delivery report for a message this device sent."""

    device: Device
    msg_id: str
    delivered: bool
    cause: str | None = None


# --- settings and context -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginSettings:
    """One configured instance of a plugin: ``[credentials.NAME]`` or ``[transports.NAME]``.

    ``options`` holds the plugin's own keys; read each with a typed getter and finish with
    ``options.check_unknown()`` so a misspelt key fails at start, naming itself.
    ``base_dir`` is the config file's folder, for relative paths.
    """

    name: str
    plugin: str
    options: Options
    base_dir: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportSettings(PluginSettings):
    """A transport instance, with the devices the config maps for it.

    ``service_id_template`` (for example ``"{device}@iot.example"``) admits devices that
    are not listed: the gateway learns them from their first message. ``pipeline`` is how
    many of one device's messages may be in flight at once in each direction (1: one at a
    time, in order; see :func:`gatewayd.envelope.device_lane`).
    """

    devices: tuple[Device, ...] = ()
    service_id_template: str | None = None
    pipeline: int = 1

    def device_options(self, index: int) -> Options:
        """The transport's own keys of ``devices[index]``, for errors naming the key path."""
        return self.options.nested(self.devices[index].options, f"devices[{index}]")


class PluginContext(Protocol):
    """What the gateway offers every plugin instance."""

    @property
    def log(self) -> Logger:
        """A logger bound to this plugin instance."""
        ...

    def credentials(self, name: str) -> CredentialBackend:
        """The credential backend configured as ``[credentials.NAME]``.

        Raises :class:`ConfigError` when there is none.
        """
        ...


class KeyValueStore(Protocol):
    """A transport's own durable table of short strings, each with a time to live.

    For protocol facts that must survive a restart (an SMSC's message ids, to match
    delivery receipts that arrive after it). Rows are private to the transport
    instance (``[transports.NAME]``), live in the gateway's store and are gone after
    ``ttl`` seconds. Writes return once committed. Keep values small (JSON is fine):
    this is an index, not a message store.
    """

    async def get(self, key: str) -> str | None:
        """The value of ``key``, or ``None`` when it was never set, deleted or expired."""
        ...

    async def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The values of those ``keys`` that exist (one round trip)."""
        ...

    async def put(self, key: str, value: str, *, ttl: float) -> None:
        """Set ``key`` (replacing an earlier value) for ``ttl`` seconds."""
        ...

    async def put_many(self, items: Mapping[str, str], *, ttl: float) -> None:
        """Set several keys in one commit."""
        ...

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove ``keys``; absent ones are ignored."""
        ...


class TransportContext(PluginContext, Protocol):
    """What the gateway offers a transport: intake, its device mapping and its own
    durable key/value table."""

    @property
    def kv(self) -> KeyValueStore:
        """This transport instance's :class:`KeyValueStore`."""
        ...

    @property
    def pipeline(self) -> int:
        """How many of one device's messages the gateway keeps in flight at once, each
        way (``transports.NAME.pipeline``). 1, the default, promises per-device order; a
        transport that serialises a device's intake to keep that order need not when it
        is above 1. Read it where it matters: a reload (SIGHUP) may change it."""
        ...

    async def accept(self, uplink: Uplink) -> Acceptance:
        """Store a device's message durably; return only once it is committed.

        Acknowledge the message to the device (PUBACK, HTTP 2xx, submit_sm_resp) only
        after this returns. Raises a subclass of :class:`IntakeRefusedError` when the
        message is refused: translate its ``reason`` into the device protocol's terms.

        - ``exc.permanent`` (invalid message, unknown or refused device): the gateway has
          already kept the message in the dead-letter queue, logged and counted it.
          Answer with a final refusal the device will not retry (MQTT 5 PUBACK reason
          code, HTTP 4xx, SMPP error status); where the protocol has no such answer
          (MQTT 3.1.1) acknowledge it, so it is not redelivered forever. Log it at debug
          at most: ``intake.rejected`` is the one line per refusal that monitoring counts.
        - otherwise (:class:`BacklogFullError`: backlog or disk full): withhold the
          acknowledgement, or answer "try later" (HTTP 503 with ``retry_after``).
        """
        ...

    async def reject(self, rejection: Rejection) -> None:
        """Record input the transport itself refused for good (it does not parse).

        Kept in the dead-letter queue (queue ``intake``) with its ``reason`` and a bounded
        copy of its ``content``, logged as ``intake.rejected`` (the refusal's one line: do
        not log it again above debug) and counted; then answer the device as for a
        permanent refusal. Raises :class:`BacklogFullError` when even the record cannot be
        stored (disk full): withhold the acknowledgement then, and log that refusal.
        """
        ...

    def peer_dropped(self, count: int, detail: str) -> None:
        """The transport's peer (a broker) reports it dropped ``count`` more messages
        meant for us: logged as the warning ``transport.peer_dropped`` and counted."""
        ...

    async def accept_report(self, report: DeviceReport) -> None:
        """Store a device's own report on a downlink message it received."""
        ...

    def device(self, name: str) -> Device | None:
        """The mapped device with this transport-local name, if the config lists it."""
        ...


# --- credential backends --------------------------------------------------------------


class Signer(Protocol):
    """A private key that signs on our behalf, possibly inside an HSM."""

    @property
    def algorithm(self) -> str:
        """The JWS algorithm name of the signatures (``ES256``, ``RS256``, ...)."""
        ...

    @property
    def key_id(self) -> str | None:
        """The ``kid`` a verifier uses to pick our public key, if any."""
        ...

    async def sign(self, data: bytes) -> bytes:
        """Sign ``data``; the result is in JWS form (raw r||s for ECDSA)."""
        ...


class CredentialBackend(ABC):  # noqa: B024 - every capability is optional on purpose
    """A source of credential material: files, systemd credentials, a token endpoint, an HSM.

    A backend offers any subset of the capabilities below; the ones it lacks return
    ``None``. The gateway calls :meth:`load` at start, on SIGHUP and when one of
    :meth:`watched_paths` changes, and rebuilds its TLS contexts from what the getters
    then return: new connections use the new material, established ones carry on.
    """

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        self.settings = settings
        self.context = context

    async def load(self) -> None:  # noqa: B027 - optional, a stateless backend needs none
        """(Re)read the material. Raise :class:`CredentialError` when it is unusable."""

    def tls_identity(self) -> TlsIdentity | None:
        """Our certificate chain and key for TLS, if this backend provides them."""
        return None

    def trust_anchors(self) -> TrustAnchors | None:
        """The CAs (and CRLs) that vouch for peers, if this backend provides them."""
        return None

    def signer(self) -> Signer | None:
        """A signing key (for ``private_key_jwt`` assertions and the like), if any."""
        return None

    async def access_token(self, *, audience: str, scope: str) -> str | None:
        """An OAuth 2.0 bearer token for calls to ``audience``, if this backend issues them."""
        return None

    def watched_paths(self) -> tuple[Path, ...]:
        """Files whose change should trigger :meth:`load` (rotation without restart)."""
        return ()

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release what :meth:`load` opened (sessions, HTTP clients)."""


# --- transports -----------------------------------------------------------------------


class Transport(ABC):
    """A device-side protocol endpoint (MQTT, HTTP webhooks, SMPP, ...).

    Lifecycle, driven by the gateway: :meth:`start` (connect, listen; intake may begin),
    :meth:`run` in a task named ``transport:NAME`` (the intake loop, if the protocol
    needs one), :meth:`stop` (stop intake, close). :meth:`deliver` may be called between
    ``start`` and ``stop``, concurrently.
    """

    def __init__(self, settings: TransportSettings, context: TransportContext) -> None:
        self.settings = settings
        self.context = context

    @property
    def name(self) -> str:
        return self.settings.name

    @abstractmethod
    async def start(self) -> None:
        """Connect or listen. Raise :class:`GatewaydError` when that is impossible: at
        the gateway's start that refuses the start; any other exception (or any failure
        at a restart) is logged and retried after a backoff."""

    async def run(self) -> None:  # noqa: B027 - a listener-based transport needs no loop
        """The intake loop; return when stopped. It owns its reconnects; an exception here
        is logged (``transport.failed``) and the gateway stops this instance and starts a
        new one after a backoff, leaving the other transports alone."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop intake, finish what is in flight, release the connection."""

    @abstractmethod
    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        """Deliver a downlink message; the outcome is the transport's evidence of it."""

    def link_state(self) -> dict[str, str | int]:
        """The link as ``gatewayd status`` shows it: ``state`` (connected, bound,
        listening, ...) plus counts worth a glance (binds, reconnects). Override it."""
        return {"state": "started"}

    async def deliver_report(self, report: UplinkReport) -> bool:
        """Pass the server's report on an uplink message to the device, if the protocol can.

        Return ``False`` when it cannot (the report is then only logged)."""
        return False

    # Every transport is an async context manager: ``async with transport:`` is start()
    # and stop(), whichever form it is written in.
    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class ManagedTransport(Transport):
    """The context-manager form of a transport: one :meth:`lifespan` instead of a
    ``start``/``stop`` pair, so a resource is released by the same code that took it.

    ``lifespan`` sets up (connect, listen; raise :class:`GatewaydError` when that is
    impossible), yields while the transport serves (the gateway runs :meth:`run` in its
    task group meanwhile) and tears down in its ``finally``. The gateway enters it with
    :meth:`start` and leaves it with :meth:`stop`, bounded by the stop deadline::

        @contextlib.asynccontextmanager
        async def lifespan(self) -> AsyncIterator[None]:
            server = await open_listener()
            try:
                yield
            finally:
                await server.close()
    """

    _lifespan: AbstractAsyncContextManager[None] | None = None

    @abstractmethod
    def lifespan(self) -> AbstractAsyncContextManager[None]:
        """Set up, yield while serving, tear down in ``finally``."""

    async def start(self) -> None:
        cm = self.lifespan()
        await cm.__aenter__()
        self._lifespan = cm

    async def stop(self) -> None:
        cm, self._lifespan = self._lifespan, None
        if cm is not None:
            await cm.__aexit__(None, None, None)


# --- registration ---------------------------------------------------------------------

C = TypeVar("C")


class Registry(Generic[C]):
    """Where a hook registers the classes it offers, under the name the config uses."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._classes: dict[str, C] = {}
        self._owners: dict[str, str] = {}
        self.current_plugin = "?"

    def add(self, name: str, cls: C) -> None:
        if name in self._classes:
            raise PluginError(
                f"{self._kind} {name!r} is registered twice "
                f"(by {self._owners[name]} and {self.current_plugin})"
            )
        self._classes[name] = cls
        self._owners[name] = self.current_plugin

    def require(self, settings: PluginSettings) -> C:
        """The class a ``[credentials.NAME]`` or ``[transports.NAME]`` table names in its
        ``plugin`` key; a :class:`ConfigError` naming that key when none is installed."""
        cls = self._classes.get(settings.plugin)
        if cls is None:
            known = ", ".join(self.names()) or "none"
            raise settings.options.error(
                "plugin", f"no {self._kind} {settings.plugin!r} is installed (installed: {known})"
            )
        return cls

    def get(self, name: str) -> C | None:
        return self._classes.get(name)

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._classes))


TransportFactory = Callable[[TransportSettings, TransportContext], Transport]
CredentialFactory = Callable[[PluginSettings, PluginContext], CredentialBackend]
