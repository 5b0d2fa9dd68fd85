"""The one lifecycle owner: start in order, run, drain, stop in reverse.

Start: store -> credentials -> API server -> admin listener -> transports -> workers and
registration; READY=1 only once the registration holds and a store write commits (STATUS=
says what the start waits for meanwhile). A listen address in use or a transport whose
``start()`` raises ends the start with an error naming the config key or the transport.
Stop (SIGTERM, or the injected trigger in tests): 1. stop taking downlink from
the server, 2. finish the work in flight within ``gateway.drain_timeout`` (what is left
stays in the store for the next start), 3. stop transports, 4. deregister, 5. close the
northbound client, 6. close the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import structlog

from gatewayd import config, metrics, status
from gatewayd.admin import AdminServer
from gatewayd.api import (
    Acceptance,
    CredentialBackend,
    Device,
    DeviceReport,
    Rejection,
    Transport,
    TransportSettings,
    Uplink,
)
from gatewayd.config import Settings
from gatewayd.credentials import Credentials, PluginContext
from gatewayd.errors import (
    ConfigError,
    GatewaydError,
    IntakeRefusedError,
    ListenError,
    StoreError,
    TransportStartError,
)
from gatewayd.lifecycle import (
    DEREGISTER_MIN_SECONDS,
    TRANSPORT_STOP_SECONDS,
    StopDeadline,
    TransportSupervisor,
    stop_within,
)
from gatewayd.northbound.client import MsgsClient
from gatewayd.northbound.registration import Registrar
from gatewayd.northbound.senders import Senders
from gatewayd.northbound.server import GatewayApi
from gatewayd.options import ListenAddress
from gatewayd.plugins import Plugins
from gatewayd.processes import Part, PipeNeighbour
from gatewayd.relay import (
    EXPIRY_SWEEP_SECONDS,
    Directory,
    Dispatcher,
    ExpirySweep,
    TransportIntake,
    forget_devices,
)
from gatewayd.retry import CircuitBreaker
from gatewayd.security import tls
from gatewayd.store import Queue, Store, open_store
from gatewayd.store.follow import Split
from gatewayd.store.kv import MemoryKV, StoreKV
from gatewayd.store.schema import private_dir
from gatewayd.systemd import Notifier
from gatewayd.tasks import TaskSet
from gatewayd.worker import Handler, QueueWorker

log = structlog.get_logger(__name__)

# With a shared store: how often an instance looks for devices the others learned.
DIRECTORY_SYNC_SECONDS = 2.0


class _CheckOnlyContext(PluginContext):
    """For ``check-config``: a transport may be built, never fed."""

    def __init__(
        self, name: str, credentials: Callable[[str], CredentialBackend], pipeline: int
    ) -> None:
        super().__init__(name, credentials)
        self.pipeline = pipeline

    @functools.cached_property
    def kv(self) -> MemoryKV:
        return MemoryKV()

    async def accept(self, uplink: Uplink) -> Acceptance:
        raise RuntimeError("check-config does not run transports")

    async def accept_report(self, report: DeviceReport) -> None:
        raise RuntimeError("check-config does not run transports")

    async def reject(self, rejection: Rejection) -> None:
        raise RuntimeError("check-config does not run transports")

    def peer_dropped(self, count: int, detail: str) -> None:
        raise RuntimeError("check-config does not run transports")

    def device(self, name: str) -> Device | None:
        return None


class Gateway:
    """One gateway process. ``run`` returns after a clean stop; errors propagate.

    ``part``: with ``gateway.processes = 2``, the side of the gateway this process runs
    (:mod:`gatewayd.processes`); ``None`` runs all of it.
    """

    def __init__(
        self,
        settings: Settings,
        plugins: Plugins,
        *,
        notifier: Notifier | None = None,
        expiry_sweep: float = EXPIRY_SWEEP_SECONDS,
        part: Part | None = None,
    ) -> None:
        self.settings = settings
        self.part = part
        # What this process runs (both unless it is one part of two).
        self.runs_northbound = part in (None, Part.NORTHBOUND)
        self.runs_devices = part in (None, Part.DEVICES)
        self.plugins = plugins
        self.notifier = notifier or Notifier()
        self.directory = Directory(settings.transports)
        self.credentials = Credentials(settings, plugins)
        self.transports: dict[str, Transport] = {}
        self.api_port: int | None = None
        self.started = asyncio.Event()
        self.ready = asyncio.Event()  # set with READY=1
        self._tasks = TaskSet()
        self.supervisors: dict[str, TransportSupervisor] = {}
        self._supervised: dict[str, asyncio.Task[Any]] = {}
        self._expiry_sweep = expiry_sweep
        self.expiry: ExpirySweep | None = None
        self._crash: BaseException | None = None
        self._stop = asyncio.Event()
        self._store: Store | None = None
        self._client: MsgsClient | None = None
        self._server_tls: ssl.SSLContext | None = None
        self._registrar: Registrar | None = None
        self._api: GatewayApi | None = None
        self._stop_deadline: StopDeadline | None = None
        self.metrics_port: int | None = None
        self.live = status.LiveState(self)
        # The file as it was when these settings were read: SIGHUP names what changed.
        self._config_at_start = (
            config.read_raw(settings.source) if settings.source.is_file() else {}
        )
        # SIGHUP and the file watcher may both ask for a reload: one at a time.
        self._reload_lock = asyncio.Lock()

    @property
    def store(self) -> Store:
        assert self._store is not None, "the gateway has not started"
        return self._store

    @property
    def store_if_open(self) -> Store | None:
        """The store while it is open (the status view asks before and after too)."""
        return self._store

    @property
    def registrar(self) -> Registrar | None:
        """The registration with the server, once :meth:`run` has created it."""
        return self._registrar

    def request_stop(self) -> None:
        self._stop.set()

    # --- run -----------------------------------------------------------------------------

    async def run(self, shutdown: Awaitable[Any] | None = None) -> None:
        s = self.settings
        async with AsyncExitStack() as stack:
            self._store = await self._open_store(stack)

            client_tls, self._server_tls = await self._load_credentials(stack)
            self._declare_metrics(stack)

            self._client = MsgsClient(
                s.northbound.api_root,
                client_tls,
                server_name=s.northbound.server_name,
                timeout=s.northbound.timeout,
                max_connections=s.northbound.max_connections,
                token=self.credentials.token_source(),
            )
            stack.push_async_callback(self._client.aclose)
            await self._open_sides(stack)

            # Every background task runs in this group: leaving it, by a stop or by a
            # cancelled run(), ends them all before anything above closes.
            failure: Exception | None = None
            async with asyncio.TaskGroup() as group:
                self._tasks = TaskSet(group=group, on_crash=self._task_crashed)
                try:
                    await self._serve(shutdown)
                except Exception as exc:  # raised as itself, not in the group's ExceptionGroup
                    failure = exc
                finally:
                    self._tasks.cancel()
            if failure is not None:
                raise failure
            # Transports, registration, client, store close in reverse (the exit stack).
        if self._crash is not None:
            raise self._crash
        log.info("gateway.stopped")

    async def _open_sides(self, stack: AsyncExitStack) -> None:
        """The API server, the admin listener and the registration (the API server and
        the registration only on the northbound side), and, to run once every task has
        ended, the deregistration and the transports' stop."""
        s = self.settings
        assert self._client is not None
        # Uplink messages and reports share the server, so they share one breaker and
        # wait for the registration; downlink goes to transports and waits for nothing.
        breaker = self.live.breaker = CircuitBreaker()
        if self.runs_northbound:
            api = self._api = GatewayApi(
                gateway_type=s.gateway_type,
                store=self.store,
                directory=self.directory,
                allowed_peers=s.api.allowed_peers,
                max_body=s.api.max_body,
                reply_route_ttl=s.relay.reply_route_ttl,
                relay=s.relay,
                token=s.api.token,
                limits=s.api.limits,
                on_unknown=self._sync_directory if self._follows_directory else None,
            )
            stack.push_async_callback(api.close)
            self.notifier.status("starting the API listener")
            assert self._server_tls is not None
            with ListenError.naming("api.listen", s.api.host, s.api.port):
                self.api_port = await api.start(s.api.host, s.api.port, self._server_tls)
            log.info("api.listening", host=s.api.host, port=self.api_port, prefix=api.prefix)
        await self._start_metrics(stack)
        if self.runs_northbound:
            assert self.api_port is not None
            self._registrar = Registrar(
                self._client,
                gateway_id=s.gateway_id,
                gateway_type=s.gateway_type,
                target_uri=s.api.advertise or f"https://{ListenAddress(s.api.host, self.api_port)}",
                service_ids=self.directory.service_ids,
                ttl=s.northbound.registration_ttl,
                policy=s.retry,
                learned=self.directory.learned,
                on_device_refused=self._device_refused,
                # A registration that holds means the server answers: the breaker closes.
                on_registered=breaker.success,
                shared=StoreKV(self.store, "gatewayd.registration") if self._shared else None,
                before_update=self._sync_directory if self._follows_directory else None,
            )
            stack.push_async_callback(self._deregister)
        # Transports stop after every task of the group has ended (their runs too).
        stack.push_async_callback(self._stop_transports)

    async def _serve(self, shutdown: Awaitable[Any] | None) -> None:
        s = self.settings
        assert self._client is not None
        if self.runs_devices:
            await self._start_transports()

        store = self.store
        dispatcher = Dispatcher(
            store=store,
            directory=self.directory,
            transports=self.transports,
            on_unknown=self._sync_directory if self._follows_directory else None,
        )
        # Each process expires only the queues it sends from (the store sees to it).
        self.expiry = ExpirySweep(store, dispatcher, interval=self._expiry_sweep)
        workers: dict[str, QueueWorker] = {}
        registrar = self._registrar
        if registrar is not None:
            senders = Senders(self._client, registrar, store, self.directory, shared=self._shared)

            def northbound(queue: Queue, handler: Handler) -> QueueWorker:
                return QueueWorker(
                    store,
                    queue,
                    handler,
                    policy=s.retry,
                    concurrency=s.northbound.concurrency,
                    breaker=self.live.breaker,
                    ready=registrar.ready,
                )

            workers["uplink"] = northbound(Queue.UPLINK, senders.uplink)
            workers["reports"] = northbound(Queue.REPORT, senders.report)
            self._tasks.spawn("registration", self._registration())
        if self.runs_devices:
            workers["downlink"] = QueueWorker(
                store,
                Queue.DOWNLINK,
                dispatcher.handle,
                policy=s.retry,
                concurrency=s.northbound.concurrency,
            )
        self.live.workers = workers
        for name, worker in workers.items():
            self._tasks.spawn(f"worker:{name}", worker.run())
        self._tasks.spawn("expiry", self.expiry.run())
        self._tasks.spawn("credentials:watch", self.credentials.watch(self.reload))
        self._tasks.spawn("credentials:expiry", self.credentials.expiry_loop())
        if self.notifier.watchdog_interval:
            self._tasks.spawn("watchdog", self._watchdog(self.notifier.watchdog_interval))
        # READY=1 waits for the registration and a store write (see _announce_ready).
        self._tasks.spawn("readiness", self._announce_ready())
        self._tasks.spawn("stats", self.live.stats_loop(s.stats_interval))
        if self._follows_directory:
            self._tasks.spawn("directory:sync", self._directory_sync_loop())
        log.info(
            "gateway.started",
            gateway_id=s.gateway_id,
            role=str(s.gateway_type),
            part=self.part and str(self.part),
            transports=sorted(self.transports),
            service_ids=len(self.directory.service_ids()),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        self.started.set()
        await self._wait(shutdown)

        # --- orderly stop ----------------------------------------------------------------
        self.notifier.stopping("draining")
        log.info("gateway.stopping", drain_timeout=s.drain_timeout)
        self._stop_deadline = StopDeadline(s.drain_timeout)
        if self._api is not None:
            await self._api.stop_intake()  # 1. no new downlink from the server
        left = self._stop_deadline.left()
        await asyncio.gather(*(w.stop(left) for w in workers.values()))  # 2. drain

    async def _wait(self, shutdown: Awaitable[Any] | None) -> None:
        waiters = [asyncio.ensure_future(self._stop.wait())]
        if shutdown is not None:
            waiters.append(asyncio.ensure_future(shutdown))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        refused = self._registrar.refused if self._registrar else None
        if refused is not None and self._crash is None:
            self._crash = refused

    # --- parts ---------------------------------------------------------------------------

    def _task_crashed(self, task: asyncio.Task[Any], exc: BaseException) -> None:
        self._crash = self._crash or exc
        self._stop.set()

    async def _registration(self) -> None:
        assert self._registrar is not None
        await self._registrar.run()
        if self._registrar.refused:
            self._stop.set()

    async def check(self, *, bind: bool = True) -> None:
        """Everything a start checks short of serving: credentials (loaded and matched to
        gateway.id), TLS contexts, plugins and their options, then that every secret
        reference resolves (even one read only later, per device) and, with ``bind``,
        that every listen address can be bound (not beside a running gateway, which
        holds them)."""
        try:
            await self.credentials.load()
            self.credentials.client_tls()
            self.credentials.server_tls()
            for ts in self.settings.transports:
                self.plugins.transports.require(ts)(
                    ts, _CheckOnlyContext(ts.name, self.credentials.get, ts.pipeline)
                )
        finally:
            await self.credentials.aclose()
        self._resolve_references()
        if bind:
            for key, address in config.listen_addresses(self.settings):
                _check_bindable(key, address.host, address.port)

    async def _load_credentials(
        self, stack: AsyncExitStack
    ) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """Credential backends loaded; the client and the API server TLS contexts."""
        self.notifier.status("loading credentials")
        stack.push_async_callback(self.credentials.aclose)
        await self.credentials.load()
        contexts = self.credentials.client_tls(), self.credentials.server_tls()
        self.credentials.check_expiry()
        return contexts

    def _resolve_references(self) -> None:
        """Every secret reference must resolve now, not when a plugin first reads it
        (an SMPP password at the first bind): check-config and run agree."""
        for ref in config.secret_refs(self.settings):
            try:
                ref.read_bytes()
            except ConfigError as exc:
                raise ConfigError(exc.key, exc.problem, source=str(self.settings.source)) from None

    def _declare_metrics(self, stack: AsyncExitStack) -> None:
        stack.callback(metrics.SAMPLER.add("gateway", self._collect_metrics))
        metrics.set_breaker("northbound", "closed")  # the breaker's name and first state
        metrics.declare_transports(ts.name for ts in self.settings.transports)
        metrics.use_transport_lookup(self._transport_of)

    async def _open_store(self, stack: AsyncExitStack) -> Store:
        self.notifier.status("opening the store")
        private_dir(self.settings.state_dir)  # 0700: the store holds bodies and Service IDs
        split = None
        if self.part is not None:
            split = Split(self.part.works, PipeNeighbour.from_environment())
        store = await open_store(self.settings.store, split)
        stack.push_async_callback(store.close)
        dropped = self.directory.restore(await store.learned_devices())
        await forget_devices(store, dropped, reason="not produced by the config")
        return store

    async def _start_transports(self) -> None:
        """Start each transport before READY. One that fails with a GatewaydError (it
        cannot listen, its material is missing) stops the start, named by the core; any
        other failure is contained: logged and retried in the background."""
        for ts in self.settings.transports:
            self.plugins.transports.require(ts)
        # As check-config does, after the plugins are known to exist.
        self._resolve_references()
        for ts in self.settings.transports:
            self.notifier.status(f"starting transport {ts.name}")
            await self._start_transport(ts)

    async def _start_transport(self, ts: TransportSettings) -> None:
        intake = TransportIntake(
            name=ts.name,
            store=self.store,
            directory=self.directory,
            relay=self.settings.relay,
            plugins=self.plugins,
            credentials=self.credentials.get,
            on_learned=self._learned,
        )
        supervisor = TransportSupervisor(
            ts, self.plugins.transports.require(ts), intake, self.transports
        )
        self.supervisors[ts.name] = supervisor
        started: Transport | None = None
        try:
            started = await supervisor.start()
        except GatewaydError as exc:
            # The operator learns which transport failed, with the plugin's exit code.
            raise TransportStartError(ts.name, ts.plugin, exc) from exc
        except Exception as exc:
            supervisor.failed("start", exc)
        self._supervised[ts.name] = self._tasks.spawn(
            f"transport:{ts.name}", supervisor.run(started)
        )

    async def _stop_transport(self, name: str) -> None:
        """One transport, for a SIGHUP that changed or removed it: its supervisor first
        (no restart behind our back), then the instance, within the transport bound."""
        task = self._supervised.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.supervisors.pop(name, None)
        transport = self.transports.pop(name, None)
        if transport is not None:
            await stop_within(transport, TRANSPORT_STOP_SECONDS)

    async def _start_metrics(self, stack: AsyncExitStack) -> None:
        """The optional admin listener (metrics, probes, status); metrics exist without it."""
        ms = self.settings.metrics
        if ms is None:
            return
        listener = AdminServer(self.live)
        stack.push_async_callback(listener.close)
        # The devices part, beside the northbound one, serves its own on the next port.
        port = ms.devices_port if self.part == Part.DEVICES else ms.port
        with ListenError.naming("metrics.listen", ms.host, port):
            bound = await listener.start(ms.host, port, ms.limits)
        self.metrics_port = bound.port
        log.info(
            "metrics.listening",
            host=bound.host,
            port=bound.port,
            path="/metrics",
            probes=["/healthz", "/readyz", "/status"],
        )

    async def _stop_transports(self) -> None:
        """Stop every running transport at once, within what is left of the deadline
        (at least TRANSPORT_STOP_SECONDS); one that hangs is abandoned."""
        left = TRANSPORT_STOP_SECONDS
        if self._stop_deadline is not None:
            left = self._stop_deadline.left(TRANSPORT_STOP_SECONDS)
        # The instances stay in self.transports: tests and the stop log look at them after.
        await asyncio.gather(*(stop_within(t, left) for t in self.transports.values()))

    @property
    def _shared(self) -> bool:
        return self.settings.store.shared

    @property
    def _follows_directory(self) -> bool:
        # Devices another process learned reach this one through the store.
        return self._shared or self.part is not None

    async def _sync_directory(self) -> bool:
        """Learn the devices the other instances on a shared store, or the other part of
        a two-process gateway, learned; a new device updates the registration."""
        try:
            added = self.directory.merge(await self.store.learned_devices())
        except StoreError as exc:
            log.warning("directory.sync_failed", error=str(exc))
            return False
        for endpoint in added:
            log.info(
                "device.learned",
                transport=endpoint.transport,
                device=endpoint.device.name,
                service_id=endpoint.device.service_id,
                by="another instance" if self._shared else "the other part",
            )
        if added and self._registrar is not None:
            self._registrar.changed()
        return bool(added)

    async def _directory_sync_loop(self) -> None:
        while True:
            await asyncio.sleep(DIRECTORY_SYNC_SECONDS)
            await self._sync_directory()

    async def _deregister(self) -> None:
        """Deregister within what is left of ``drain_timeout``: a server that does not
        answer must not hold SIGTERM up for another ``northbound.timeout``.

        Not when instances share the store: the registration is the cluster's, and the
        others keep it; it runs out by its TTL once every instance is gone."""
        assert self._registrar is not None
        if self._shared:
            log.info("registration.kept", reason="shared by the instances on the store")
            return
        timeout = self.settings.northbound.timeout
        if self._stop_deadline is not None:
            timeout = min(timeout, self._stop_deadline.left(DEREGISTER_MIN_SECONDS))
        await self._registrar.deregister(timeout)

    async def _learned(self, device: Device) -> None:
        if self._registrar is not None:
            self._registrar.changed()

    async def _device_refused(self, service_id: str, cause: str) -> None:
        """The server refused a learned device: that device only, never the gateway."""
        endpoint = self.directory.refuse(service_id, cause)
        if endpoint is None:
            return
        log.error(
            "device.refused",
            transport=endpoint.transport,
            device=endpoint.device.name,
            service_id=service_id,
            cause=cause,
        )
        # Forgotten: a restart tries it again, once.
        await forget_devices(self.store, [endpoint], reason="refused by the server")

    # --- background loops ----------------------------------------------------------------

    async def reload(self, *, reread_config: bool = False) -> None:
        """SIGHUP, or a credential file changed: new connections use the new material.

        On SIGHUP (``reread_config``) the TOML file is read again too: changed transport
        tables are applied; any other change is named (``config.restart_needed``) and
        nothing applied; a broken file is reported before a restart would trip over it.
        """
        async with self._reload_lock:
            self.notifier.reloading()
            # Whatever fails below, systemd must not be left "reloading".
            try:
                if reread_config:
                    await self._reread_config()
                rotation = await self.credentials.rotate()
                if rotation is not None:
                    assert self._client is not None
                    assert self._server_tls is not None
                    self._client.use_tls(rotation.client_tls)
                    # The listening socket keeps its context: load the new chain into it, and
                    # add the new CAs and CRLs (a newer CRL wins for new handshakes; a CA taken
                    # out of the bundle stays trusted by the API until a restart).
                    tls.load_identity(self._server_tls, rotation.api_identity)
                    tls.load_trust(self._server_tls, rotation.api_trust)
                    log.info("credentials.reloaded")
            finally:
                self.notifier.ready("reloaded")

    async def _reread_config(self) -> None:
        """Apply changed transport tables (devices included); name anything else."""
        source = self.settings.source
        try:
            fresh = config.load(source)
            now = config.read_raw(source)
        except (GatewaydError, OSError) as exc:
            log.error("config.reload_failed", path=str(source), error=str(exc))
            return
        changed = config.changed_tables(self._config_at_start, now)
        if any(not key.startswith("transports.") for key in changed):
            log.warning("config.restart_needed", path=str(source), changed=changed)
            return
        if changed:
            await self._reconfigure_transports(fresh, [k.split(".", 1)[1] for k in changed])
            self._config_at_start = now

    async def _reconfigure_transports(self, fresh: Settings, names: list[str]) -> None:
        """Stop the changed or removed transports, remap the devices, start the changed
        or added ones; the registration follows the new set of UE Service IDs."""
        wanted = {ts.name: ts for ts in fresh.transports}
        for name in names:
            await self._stop_transport(name)
        self.settings = dataclasses.replace(self.settings, transports=fresh.transports)
        # Learned devices of a removed transport, or one whose template now gives
        # another id, are dropped: neither registered nor routed, nor loaded at start.
        dropped = self.directory.reconfigure(fresh.transports)
        await forget_devices(self.store, dropped, reason="not produced by the config")
        metrics.declare_transports(wanted)
        started = []
        for name in names:
            if name in wanted and self.runs_devices:
                try:
                    await self._start_transport(wanted[name])
                    started.append(name)
                except GatewaydError as exc:  # not started, no plugin: the rest still apply
                    log.error("config.reload_failed", path=str(fresh.source), error=str(exc))
        if self._registrar is not None:
            self._registrar.changed()
        log.info(
            "config.reloaded",
            started=started,
            stopped=[n for n in names if n not in wanted],
            transports=sorted(self.transports),
        )

    async def _collect_metrics(self) -> None:
        """Before each scrape: days left as of now, the store's backlog per queue, and
        the live state (in flight, breaker, registration, readiness)."""
        self.credentials.set_expiry_gauges()
        self.live.set_gauges()
        if self._store is None:
            return
        metrics.set_store(await self._store.stats())

    def _transport_of(self, service_id: str) -> str:
        endpoint = self.directory.endpoint(service_id)
        return endpoint.transport if endpoint is not None else "unknown"

    async def _announce_ready(self) -> None:
        """READY=1 once the server holds our registration (on the northbound side) and
        the store takes a write."""
        if self._registrar is not None:
            api_root = self.settings.northbound.api_root
            self.notifier.status(f"waiting for registration with {api_root}")
            await self._registrar.ready.wait()
        while True:
            try:
                await self.store.prune()  # a write transaction: a read-only disk fails it
                break
            except (IntakeRefusedError, StoreError) as exc:
                self.notifier.status(f"waiting for the store to be writable: {exc}")
                await asyncio.sleep(EXPIRY_SWEEP_SECONDS)
        self.live.store_writable = True
        self.notifier.ready(f"serving {len(self.directory.service_ids())} UE Service IDs")
        self.ready.set()
        log.info("gateway.ready", service_ids=len(self.directory.service_ids()))

    async def _watchdog(self, interval: float) -> None:
        # Ping only while the loop keeps time: a stalled loop must let systemd restart us.
        period = interval / 2
        while True:
            before = time.monotonic()
            await asyncio.sleep(period)
            lag = time.monotonic() - before - period
            if lag < period:
                self.notifier.watchdog()
            else:
                log.warning("watchdog.loop_lagging", lag=round(lag, 3))


def _check_bindable(key: str, host: str, port: int) -> None:
    """Bind and release: an address in use or not on this host fails here, naming ``key``.

    An address in use is most often held by the gateway itself, running with this
    config: the error then says how to check a change beside it.
    """
    try:
        with ListenError.naming(key, host, port):
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, _, _, _, sockaddr in infos:
                socket.create_server(sockaddr[:2], family=family).close()
    except ListenError as exc:
        if not exc.in_use:
            raise
        hint = f"{exc.reason}; beside a running gateway, check with --no-bind"
        raise ListenError(key, host, port, hint, in_use=True) from None
