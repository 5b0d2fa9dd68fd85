"""The one lifecycle owner: start in order, run, drain, stop in reverse.

Start: store -> credentials -> API server -> transports -> workers and registration ->
READY=1. Stop (SIGTERM, or the injected trigger in tests): 1. stop taking downlink from
the server, 2. finish the work in flight within ``gateway.drain_timeout`` (what is left
stays in the store for the next start), 3. stop transports, 4. deregister, 5. close the
northbound client, 6. close the store.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import structlog

from gatewayd import log as logmod
from gatewayd import metrics
from gatewayd.api import (
    Acceptance,
    Device,
    DeviceReport,
    Transport,
    Uplink,
)
from gatewayd.config import Settings
from gatewayd.credentials import Credentials, PluginContext
from gatewayd.errors import (
    IntakeRefusedError,
    StoreError,
)
from gatewayd.msgin5g.model import UEMessageDelivery
from gatewayd.northbound.client import MsgsClient
from gatewayd.northbound.registration import Registrar
from gatewayd.northbound.senders import Senders
from gatewayd.northbound.server import GatewayApi
from gatewayd.plugins import Plugins
from gatewayd.relay import Directory, Dispatcher, TransportIntake, put_device_report
from gatewayd.retry import CircuitBreaker
from gatewayd.security import tls
from gatewayd.store import Item, Queue, Store
from gatewayd.store.schema import private_dir
from gatewayd.systemd import Notifier
from gatewayd.worker import Handler, QueueWorker

log = structlog.get_logger(__name__)

EXPIRY_SWEEP_SECONDS = 2.0


class _CheckOnlyContext(PluginContext):
    """For ``check-config``: a transport may be built, never fed."""

    async def accept(self, uplink: Uplink) -> Acceptance:
        raise RuntimeError("check-config does not run transports")

    async def accept_report(self, report: DeviceReport) -> None:
        raise RuntimeError("check-config does not run transports")

    def device(self, name: str) -> Device | None:
        return None


class Gateway:
    """One gateway process. ``run`` returns after a clean stop; errors propagate."""

    def __init__(
        self, settings: Settings, plugins: Plugins, *, notifier: Notifier | None = None
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.notifier = notifier or Notifier()
        self.directory = Directory(settings.transports)
        self.credentials = Credentials(settings, plugins)
        self.transports: dict[str, Transport] = {}
        self.api_port: int | None = None
        self.started = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._crash: BaseException | None = None
        self._stop = asyncio.Event()
        self._store: Store | None = None
        self._client: MsgsClient | None = None
        self._server_tls: ssl.SSLContext | None = None
        self._registrar: Registrar | None = None
        self.metrics_port: int | None = None
        # SIGHUP and the file watcher may both ask for a reload: one at a time.
        self._reload_lock = asyncio.Lock()

    @property
    def store(self) -> Store:
        assert self._store is not None, "the gateway has not started"
        return self._store

    def request_stop(self) -> None:
        self._stop.set()

    # --- run -----------------------------------------------------------------------------

    async def run(self, shutdown: Awaitable[Any] | None = None) -> None:
        s = self.settings
        async with AsyncExitStack() as stack:
            private_dir(s.state_dir)  # 0700: the store holds bodies and Service IDs
            self._store = await Store.open(s.store)
            stack.push_async_callback(self._store.close)
            for transport, device, service_id in await self._store.learned_devices():
                self.directory.learn(transport, Device(name=device, service_id=service_id))

            stack.push_async_callback(self.credentials.aclose)
            await self.credentials.load()
            client_tls = self.credentials.client_tls()
            self._server_tls = self.credentials.server_tls()
            self.credentials.check_expiry()
            stack.callback(metrics.REGISTRY.add_collector("gateway", self._collect_metrics))

            self._client = MsgsClient(
                s.northbound.api_root,
                client_tls,
                server_name=s.northbound.server_name,
                timeout=s.northbound.timeout,
                max_connections=s.northbound.max_connections,
                token=self.credentials.token_source(),
            )
            stack.push_async_callback(self._client.aclose)

            api = GatewayApi(
                gateway_type=s.gateway_type,
                store=self._store,
                directory=self.directory,
                allowed_peers=s.api.allowed_peers,
                max_body=s.api.max_body,
                reply_route_ttl=s.relay.reply_route_ttl,
                token=s.api.token,
                limits=s.api.limits,
            )
            stack.push_async_callback(api.close)
            self.api_port = await api.start(s.api.host, s.api.port, self._server_tls)
            log.info("api.listening", host=s.api.host, port=self.api_port, prefix=api.prefix)
            await self._start_metrics(stack)

            self._registrar = Registrar(
                self._client,
                gateway_id=s.gateway_id,
                gateway_type=s.gateway_type,
                target_uri=s.api.advertise or _api_root(s.api.host, self.api_port),
                service_ids=self.directory.service_ids,
                ttl=s.northbound.registration_ttl,
                policy=s.retry,
            )
            stack.push_async_callback(self._registrar.deregister, s.northbound.timeout)

            await self._start_transports(stack)

            store, registrar = self._store, self._registrar
            senders = Senders(self._client, registrar, store)
            dispatcher = Dispatcher(
                store=self._store, directory=self.directory, transports=self.transports
            )
            # Uplink messages and reports share the server, so they share one breaker and
            # wait for the registration; downlink goes to transports and waits for nothing.
            breaker = CircuitBreaker()

            def northbound(queue: Queue, handler: Handler) -> QueueWorker:
                return QueueWorker(
                    store,
                    queue,
                    handler,
                    policy=s.retry,
                    concurrency=s.northbound.concurrency,
                    breaker=breaker,
                    ready=registrar.ready,
                )

            workers = {
                "uplink": northbound(Queue.UPLINK, senders.uplink),
                "reports": northbound(Queue.REPORT, senders.report),
                "downlink": QueueWorker(
                    store,
                    Queue.DOWNLINK,
                    dispatcher.handle,
                    policy=s.retry,
                    concurrency=s.northbound.concurrency,
                ),
            }
            self._spawn("registration", self._registrar.run())
            for name, worker in workers.items():
                self._spawn(f"worker:{name}", worker.run())
            self._spawn("expiry", self._expiry_loop(dispatcher))
            self._spawn("credentials:watch", self.credentials.watch(self.reload))
            self._spawn("credentials:expiry", self.credentials.expiry_loop())
            if self.notifier.watchdog_interval:
                self._spawn("watchdog", self._watchdog(self.notifier.watchdog_interval))

            self.notifier.ready(f"serving {len(self.directory.service_ids())} UE Service IDs")
            log.info(
                "gateway.started",
                gateway_id=s.gateway_id,
                role=str(s.gateway_type),
                transports=sorted(self.transports),
                service_ids=len(self.directory.service_ids()),
            )
            self.started.set()
            await self._wait(shutdown)

            # --- orderly stop ------------------------------------------------------------
            self.notifier.stopping("draining")
            log.info("gateway.stopping", drain_timeout=s.drain_timeout)
            await api.stop_intake()  # 1. no new downlink from the server
            deadline = s.drain_timeout
            await asyncio.gather(*(w.stop(deadline) for w in workers.values()))  # 2. drain
            await self._cancel_tasks()
            # 3-6: transports, registration, client, store close in reverse (exit stack).
        if self._crash is not None:
            raise self._crash
        log.info("gateway.stopped")

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

    def _spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task.crashed", task=task.get_name(), error=repr(exc), exc_info=exc)
            self._crash = self._crash or exc
            self._stop.set()
        elif task.get_name() == "registration" and self._registrar and self._registrar.refused:
            self._stop.set()

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def check(self) -> None:
        """Everything a start checks short of opening sockets: plugins, their options,
        credentials (loaded and matched to gateway.id) and TLS contexts."""
        try:
            await self.credentials.load()
            self.credentials.client_tls()
            self.credentials.server_tls()
            for ts in self.settings.transports:
                self.plugins.transports.require(ts)(
                    ts, _CheckOnlyContext(ts.name, self.credentials.get)
                )
        finally:
            await self.credentials.aclose()

    async def _start_transports(self, stack: AsyncExitStack) -> None:
        for ts in self.settings.transports:
            factory = self.plugins.transports.require(ts)
            intake = TransportIntake(
                name=ts.name,
                store=self.store,
                directory=self.directory,
                relay=self.settings.relay,
                plugins=self.plugins,
                credentials=self.credentials.get,
                on_learned=self._learned,
            )
            transport = factory(ts, intake)
            await transport.start()
            stack.push_async_callback(self._stop_transport, transport)
            self.transports[ts.name] = transport
            self._spawn(f"transport:{ts.name}", transport.run())
            log.info("transport.started", transport=ts.name, plugin=ts.plugin)

    async def _start_metrics(self, stack: AsyncExitStack) -> None:
        """The optional Prometheus endpoint; gauges and counters exist without it."""
        ms = self.settings.metrics
        if ms is None:
            return
        exporter = metrics.MetricsServer()
        stack.push_async_callback(exporter.close)
        bound = await exporter.start(ms.host, ms.port, ms.limits)
        self.metrics_port = bound.port
        log.info("metrics.listening", host=bound.host, port=bound.port, path="/metrics")

    async def _stop_transport(self, transport: Transport) -> None:
        try:
            await transport.stop()
            log.info("transport.stopped", transport=transport.name)
        except Exception as exc:
            log.exception("transport.stop_failed", transport=transport.name, error=repr(exc))

    async def _learned(self, device: Device) -> None:
        if self._registrar is not None:
            self._registrar.changed()

    # --- background loops ----------------------------------------------------------------

    async def _expiry_loop(self, dispatcher: Dispatcher) -> None:
        # Expired items whose failure report could not be stored yet (a full disk). They
        # are in the DLQ already, so their reports are retried here, every sweep; the
        # report's dedup key makes a retry that did land harmless.
        unreported: list[Item] = []
        deferred = False
        while True:
            try:
                for item in await self.store.expire():
                    with logmod.bound_message(item.msg_id, queue=str(item.queue)):
                        log.warning("message.expired", to="dead-letter queue")
                    unreported.append(item)
                while unreported:
                    await self._report_expired(unreported[0], dispatcher)
                    unreported.pop(0)
                await self.store.prune()
                deferred = False
            except (IntakeRefusedError, StoreError) as exc:
                # A full or failing disk must not stop the gateway: sweep again later.
                if not deferred:
                    log.warning("expiry.deferred", error=str(exc), unreported=len(unreported))
                deferred = True
            await asyncio.sleep(EXPIRY_SWEEP_SECONDS)

    async def _report_expired(self, item: Item, dispatcher: Dispatcher) -> None:
        with logmod.bound_message(item.msg_id, queue=str(item.queue)):
            if item.queue == Queue.UPLINK:
                await put_device_report(
                    self.store, UEMessageDelivery.from_json(item.body), "EXPIRED"
                )
            elif item.queue == Queue.DOWNLINK:
                await dispatcher.expired(item)

    async def reload(self) -> None:
        """SIGHUP, or a credential file changed: new connections use the new material."""
        async with self._reload_lock:
            self.notifier.reloading()
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
            self.notifier.ready("reloaded")

    async def _collect_metrics(self) -> None:
        """Before each scrape: days left as of now, and the store's backlog per queue."""
        self.credentials.set_expiry_gauges()
        if self._store is None:
            return
        stats = await self._store.stats()
        for queue, counts in stats["queues"].items():
            metrics.STORE_BACKLOG.set(counts["pending"], queue=queue)
            metrics.STORE_DEAD.set(counts["dead"], queue=queue)

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


def _api_root(host: str, port: int) -> str:
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
