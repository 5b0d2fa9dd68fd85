"""In-memory stand-ins for what the gateway hands a plugin, for a plugin's unit tests.

A transport's tests build it on a :class:`MemoryTransportContext` and look at what it
handed over; a credential backend's tests build it on a :class:`MemoryPluginContext`
whose ``backends`` play the other ``[credentials.NAME]`` tables, for example a
:class:`StaticCredentials`::

    context = MemoryTransportContext(settings.devices, transport="web")
    context.backends["devices"] = StaticCredentials(identity, trust, name="devices")
    transport = MyTransport(settings, context)
    await transport.start()
    ...  # drive a device
    await context.wait_for(1)
    assert context.accepted[0].payload == "hi"

Both contexts look their logger up on each use, so events a plugin logs through
``context.log`` reach :func:`structlog.testing.capture_logs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import structlog

from gatewayd.api import (
    Acceptance,
    BacklogFullError,
    ConfigError,
    CredentialBackend,
    Device,
    DeviceReport,
    Logger,
    Options,
    PluginContext,
    PluginSettings,
    Rejection,
    TlsIdentity,
    TransportContext,
    TransportSettings,
    TrustAnchors,
    Uplink,
)
from gatewayd.store.kv import MemoryKV

__all__ = [
    "MemoryKV",
    "MemoryPluginContext",
    "MemoryTransportContext",
    "StaticCredentials",
    "plugin_settings",
    "transport_settings",
]


def plugin_settings(
    name: str,
    options: Mapping[str, object],
    base_dir: Path = Path(),
    *,
    plugin: str = "test",
    source: str = "gw.toml",
) -> PluginSettings:
    """What the gateway hands a ``[credentials.NAME]`` backend: its own keys, addressed
    as ``credentials.NAME`` in ``source`` so config errors read as they do in production;
    relative secret files are taken from ``base_dir``, as from the config file's folder."""
    return PluginSettings(
        name=name,
        plugin=plugin,
        options=Options(options, f"credentials.{name}", source=source, base=base_dir),
        base_dir=base_dir,
    )


def transport_settings(
    name: str,
    plugin: str,
    options: Mapping[str, object],
    devices: Iterable[Mapping[str, object]] = (),
    base_dir: Path = Path(),
    *,
    service_id_template: str | None = None,
    source: str = "gw.toml",
) -> TransportSettings:
    """What the gateway hands a ``[transports.NAME]`` transport.

    ``devices`` are the ``[[transports.NAME.devices]]`` tables as the config has them:
    ``device`` and ``service_id`` (default ``ue-<device>@iot.example``) are the core's,
    every other key is the transport's own (read with ``settings.device_options(i)``).
    """
    mapped = tuple(
        Device(
            name=str(d["device"]),
            service_id=str(d.get("service_id", f"ue-{d['device']}@iot.example")),
            options={k: v for k, v in d.items() if k not in ("device", "service_id")},
        )
        for d in devices
    )
    return TransportSettings(
        name=name,
        plugin=plugin,
        options=Options(options, f"transports.{name}", source=source, base=base_dir),
        base_dir=base_dir,
        devices=mapped,
        service_id_template=service_id_template,
    )


class MemoryPluginContext:
    """A real :class:`~gatewayd.api.PluginContext`: a logger and a dict of backends.

    ``backends`` stands for the configured ``[credentials.NAME]`` tables: add to it
    what the plugin under test looks up. :meth:`credentials` raises
    :class:`~gatewayd.api.ConfigError` naming ``credentials.NAME`` for a missing one,
    as the gateway does.
    """

    def __init__(self, backends: Mapping[str, CredentialBackend] | None = None) -> None:
        self.backends: dict[str, CredentialBackend] = dict(backends or {})
        self._bound: dict[str, object] = {}

    @property
    def log(self) -> Logger:
        """A ``test`` logger, looked up on each use so ``capture_logs`` sees its events."""
        return cast(Logger, structlog.get_logger("test").bind(**self._bound))

    def credentials(self, name: str) -> CredentialBackend:
        try:
            return self.backends[name]
        except KeyError:
            raise ConfigError(f"credentials.{name}", "no such [credentials.NAME] table") from None


class MemoryTransportContext(MemoryPluginContext):
    """A real, in-memory :class:`~gatewayd.api.TransportContext`: the gateway's intake.

    :meth:`accept` records each distinct message once, in ``accepted`` (in order) and
    ``by_msg_id`` (by its own msgId, or the ``gw-N`` the intake assigns when it has
    none); a repeated msgId is answered ``duplicate=True`` and counted in
    ``duplicates``. :meth:`accept_report` records device reports in ``reports``,
    :meth:`reject` input the transport refused in ``rejected``, :meth:`peer_dropped`
    adds to ``peer_drops``.
    ``pipeline`` is the transport's ``transports.NAME.pipeline`` (1 unless given).
    ``device()`` looks names up among ``devices`` (``transport`` binds
    ``transport=NAME`` to the log, as the gateway does). ``kv`` is a
    :class:`~gatewayd.store.kv.MemoryKV` (pass ``kv=`` to share one between two
    transport instances and play a restart).

    Knobs a test sets to shape :meth:`accept` (checked in this order):

    - ``gate``: an event accept() waits for (``entered`` is set once a call came in);
    - ``delay``: seconds each call takes before answering;
    - ``refuse``: an exception raised by every accept() and accept_report() while set;
    - ``refusals``: the next this many calls raise
      :class:`~gatewayd.api.BacklogFullError` with ``retry_after`` (it counts down);
    - ``duplicate``: answer every new message ``duplicate=True`` (it is still recorded).

    Counters: ``calls`` (accept() calls), ``refused`` (calls refused either way),
    ``active`` / ``max_active`` (calls in progress, now and at most). ``changed`` is set
    whenever something is recorded; :meth:`wait_for` waits on it.
    """

    def __init__(
        self,
        devices: Iterable[Device] = (),
        *,
        transport: str | None = None,
        backends: Mapping[str, CredentialBackend] | None = None,
        kv: MemoryKV | None = None,
        pipeline: int = 1,
    ) -> None:
        super().__init__(backends)
        self.kv = kv if kv is not None else MemoryKV()
        self.pipeline = pipeline  # transports.NAME.pipeline, as the gateway would give it
        if transport is not None:
            self._bound["transport"] = transport
        self.devices: dict[str, Device] = {d.name: d for d in devices}
        self.accepted: list[Uplink] = []
        self.by_msg_id: dict[str, Uplink] = {}
        self.duplicates = 0
        self.reports: list[DeviceReport] = []
        self.rejected: list[tuple[str, str, str | None]] = []
        self.peer_drops = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.delay = 0.0
        self.refuse: Exception | None = None
        self.refusals = 0
        self.retry_after: float | None = 0.05
        self.duplicate = False
        self.calls = 0
        self.refused = 0
        self.active = 0
        self.max_active = 0
        self.changed = asyncio.Event()

    def device(self, name: str) -> Device | None:
        return self.devices.get(name)

    async def accept(self, uplink: Uplink) -> Acceptance:
        self.calls += 1
        self.entered.set()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.refuse is not None:
                self.refused += 1
                raise self.refuse
            if self.refusals > 0:
                self.refusals -= 1
                self.refused += 1
                raise BacklogFullError("backlog full (test)", retry_after=self.retry_after)
            msg_id = uplink.msg_id or f"gw-{len(self.accepted) + 1}"
            if msg_id in self.by_msg_id:
                self.duplicates += 1
                return Acceptance(msg_id=msg_id, duplicate=True)
            self.accepted.append(uplink)
            self.by_msg_id[msg_id] = uplink
            self.changed.set()
            return Acceptance(msg_id=msg_id, duplicate=self.duplicate)
        finally:
            self.active -= 1

    async def accept_report(self, report: DeviceReport) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.reports.append(report)
        self.changed.set()

    async def reject(self, rejection: Rejection) -> None:
        """Records ``(device, reason, msg_id)`` in ``rejected``; raises ``refuse`` if it is
        a storage refusal (the record could not be stored either)."""
        if self.refuse is not None and getattr(self.refuse, "permanent", True) is False:
            raise self.refuse
        self.rejected.append((rejection.device, rejection.reason, rejection.msg_id))
        self.changed.set()

    def peer_dropped(self, count: int, detail: str) -> None:
        """Adds ``count`` to ``peer_drops``."""
        self.peer_drops += count

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` messages and reports in all are recorded; fails on timeout."""
        async with asyncio.timeout(timeout):
            while len(self.accepted) + len(self.reports) < count:
                self.changed.clear()
                await self.changed.wait()


class StaticCredentials(CredentialBackend):
    """A ``[credentials.NAME]`` backend holding fixed material, as x509's does after load().

    ``identity`` and ``trust`` are plain attributes: replace them to simulate a
    rotation. Without a ``context`` it gets an empty :class:`MemoryPluginContext`.
    """

    def __init__(
        self,
        identity: TlsIdentity | None = None,
        trust: TrustAnchors | None = None,
        *,
        name: str = "static",
        context: PluginContext | None = None,
    ) -> None:
        settings = PluginSettings(
            name=name,
            plugin="static",
            options=Options({}, f"credentials.{name}"),
            base_dir=Path(),
        )
        super().__init__(settings, context if context is not None else MemoryPluginContext())
        self.identity = identity
        self.trust = trust

    def tls_identity(self) -> TlsIdentity | None:
        return self.identity

    def trust_anchors(self) -> TrustAnchors | None:
        return self.trust


if TYPE_CHECKING:  # mypy: the stand-ins keep up with the protocols they stand in for
    _plugin_context: type[PluginContext] = MemoryPluginContext
    _transport_context: type[TransportContext] = MemoryTransportContext
