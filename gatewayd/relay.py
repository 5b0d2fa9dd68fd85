"""Turns device messages into MSGin5G messages and back (TS 23.554 clauses 8.5-8.7).

- identity mapping: device on a transport <-> UE Service ID (:class:`Directory`);
- reply routing: a device's reply without a destination goes to whoever last wrote to it;
- delivery reports: built from transport evidence when ``delivStReqInd`` asked for one.

A payload over ``relay.max_payload`` bytes leaves as MSGin5G segments, and downlink
segments are delivered once whole: both in :mod:`gatewayd.segments`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from gatewayd import metrics, segments
from gatewayd.api import (
    Acceptance,
    CredentialBackend,
    DeliveryOutcome,
    Device,
    DeviceRefusedError,
    DeviceReport,
    Downlink,
    IntakeRefusedError,
    InvalidMessageError,
    Rejection,
    Transport,
    TransportSettings,
    UnknownDeviceError,
    Uplink,
    UplinkReport,
)
from gatewayd.config import RelaySettings
from gatewayd.envelope import (
    KIND_MESSAGE,
    KIND_REPORT,
    device_lane,
    device_report_request,
    rejected_key,
    report_request,
    uplink_key,
)
from gatewayd.errors import StoreError
from gatewayd.log import bound_message
from gatewayd.msgin5g.model import (
    Address,
    DeliveryStatusReport,
    GatewayMessageDelivery,
    UEMessageDelivery,
)
from gatewayd.plugins import Plugins
from gatewayd.store import Item, PutRequest, Queue, Store
from gatewayd.store.kv import StoreKV
from gatewayd.worker import Dead, Done, Outcome, Retry

log = structlog.get_logger(__name__)

EXPIRY_SWEEP_SECONDS = 2.0

# How much of a rejected input the dead-letter record keeps: enough to diagnose it,
# not enough for a misbehaving device to fill the disk through the DLQ.
REJECTED_CONTENT_MAX = 2048


@dataclass(frozen=True, slots=True)
class Endpoint:
    transport: str
    device: Device


class Directory:
    """Who is who: (transport, device) <-> UE Service ID, static and learned."""

    def __init__(self, transports: tuple[TransportSettings, ...]) -> None:
        self._by_device: dict[tuple[str, str], Device] = {}
        self._by_service: dict[str, Endpoint] = {}
        self._templates = {t.name: t.service_id_template for t in transports}
        self._pipelines = {t.name: t.pipeline for t in transports}
        self._learned: set[str] = set()
        # Learned devices the server refused: refused at intake until a restart.
        self._refused: dict[tuple[str, str], str] = {}
        for t in transports:
            for d in t.devices:
                self._add(t.name, d)

    def reconfigure(self, transports: tuple[TransportSettings, ...]) -> list[Endpoint]:
        """New transport tables (SIGHUP). Learned devices the new tables still produce
        stay; the others are dropped and returned, for the caller to forget in the store
        (see :meth:`restore`). A refusal stays while its transport's template does."""
        learned = [self._by_service[service_id] for service_id in sorted(self._learned)]
        fresh = Directory(transports)
        self._refused = {
            (transport, name): cause
            for (transport, name), cause in self._refused.items()
            if fresh._templates.get(transport) == self._templates.get(transport)
        }
        self._by_device, self._by_service = fresh._by_device, fresh._by_service
        self._templates, self._learned = fresh._templates, set()
        self._pipelines = fresh._pipelines
        # In one go, no await: no moment in which a kept learned device is unknown.
        return self.restore((e.transport, e.device.name, e.device.service_id) for e in learned)

    def restore(self, learned: Iterable[tuple[str, str, str]]) -> list[Endpoint]:
        """Learn again devices learned before, as ``(transport, device, service_id)``
        (the store's rows at start, the directory's own on reconfigure).

        A device is learned again only if the config would learn it now the same way:
        its transport has a ``service_id_template`` that gives the same UE Service ID,
        and no configured device has its name or that id. The others are returned: the
        caller forgets them in the store, or they would be registered and routed again.
        """
        dropped = []
        for transport, name, service_id in learned:
            device = self.learnable(transport, name)
            if (
                device is None
                or device.service_id != service_id
                or self.device(transport, name) is not None
                or self.endpoint(service_id) is not None
            ):
                dropped.append(Endpoint(transport, Device(name=name, service_id=service_id)))
            else:
                self.learn(transport, device)
        return dropped

    def merge(self, learned: Iterable[tuple[str, str, str]]) -> list[Endpoint]:
        """Learn the devices other instances learned (a shared store): those the config
        would learn the same way and this directory does not know yet. Returns them.

        Unlike :meth:`restore`, nothing is dropped: a device this instance cannot learn
        stays the business of the instance that learned it."""
        added = []
        for transport, name, service_id in learned:
            device = self.learnable(transport, name)
            if (
                device is not None
                and device.service_id == service_id
                and self.device(transport, name) is None
                and self.endpoint(service_id) is None
                and (transport, name) not in self._refused
            ):
                self.learn(transport, device)
                added.append(Endpoint(transport, device))
        return added

    def _add(self, transport: str, device: Device) -> None:
        self._by_device[(transport, device.name)] = device
        self._by_service[device.service_id] = Endpoint(transport, device)

    def device(self, transport: str, name: str) -> Device | None:
        return self._by_device.get((transport, name))

    def endpoint(self, service_id: str) -> Endpoint | None:
        return self._by_service.get(service_id)

    def pipeline(self, service_id: str) -> int:
        """``pipeline`` of the transport serving ``service_id`` (1 when none does): the
        last argument of :func:`~gatewayd.envelope.device_lane` for its lanes."""
        endpoint = self._by_service.get(service_id)
        return 1 if endpoint is None else self.transport_pipeline(endpoint.transport)

    def transport_pipeline(self, transport: str) -> int:
        """``transports.NAME.pipeline`` of ``transport`` (1 for a name not configured)."""
        return self._pipelines.get(transport, 1)

    def learnable(self, transport: str, name: str) -> Device | None:
        """The device a template would admit, or ``None`` when the transport has none."""
        template = self._templates.get(transport)
        if template is None:
            return None
        return Device(name=name, service_id=template.format(device=name))

    def learn(self, transport: str, device: Device) -> None:
        self._add(transport, device)
        self._learned.add(device.service_id)

    def learned(self) -> frozenset[str]:
        """The UE Service IDs of learned (not configured) devices."""
        return frozenset(self._learned)

    def refuse(self, service_id: str, cause: str) -> Endpoint | None:
        """The server refused a learned device: forget it, and refuse its input."""
        endpoint = self._by_service.get(service_id)
        if endpoint is None or service_id not in self._learned:
            return None
        del self._by_service[service_id]
        self._by_device.pop((endpoint.transport, endpoint.device.name), None)
        self._learned.discard(service_id)
        self._refused[(endpoint.transport, endpoint.device.name)] = cause
        return endpoint

    def refused(self, transport: str, name: str) -> str | None:
        return self._refused.get((transport, name))

    def service_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_service))


async def forget_devices(store: Store, endpoints: Iterable[Endpoint], *, reason: str) -> None:
    """Remove learned devices from the store, so a restart does not learn them again.

    A store that fails is logged and passed over: the device is out of the directory
    already, and :meth:`Directory.restore` drops it again at the next start.
    """
    for endpoint in endpoints:
        try:
            await store.forget_device(endpoint.transport, endpoint.device.name)
        except StoreError as exc:
            log.warning("device.forget_failed", device=endpoint.device.name, error=str(exc))
            continue
        log.info(
            "device.forgotten",
            transport=endpoint.transport,
            device=endpoint.device.name,
            service_id=endpoint.device.service_id,
            reason=reason,
        )


class TransportIntake:
    """The :class:`~gatewayd.api.TransportContext` one transport instance gets."""

    def __init__(
        self,
        *,
        name: str,
        store: Store,
        directory: Directory,
        relay: RelaySettings,
        plugins: Plugins,
        credentials: Callable[[str], CredentialBackend],
        on_learned: Callable[[Device], Awaitable[None]],
    ) -> None:
        self._name = name
        self._store = store
        self._directory = directory
        self._relay = relay
        self._plugins = plugins
        self._credentials = credentials
        self._on_learned = on_learned
        self._log = structlog.get_logger("gatewayd.transport").bind(transport=name)
        self.kv = StoreKV(store, name)  # the transport's own durable key/value table

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        return self._log  # type: ignore[no-any-return]

    @property
    def pipeline(self) -> int:
        return self._directory.transport_pipeline(self._name)

    def credentials(self, name: str) -> CredentialBackend:
        return self._credentials(name)

    def device(self, name: str) -> Device | None:
        return self._directory.device(self._name, name)

    async def _resolve(self, name: str) -> Device:
        device = self._directory.device(self._name, name)
        if device is not None:
            return device
        cause = self._directory.refused(self._name, name)
        if cause is not None:
            raise DeviceRefusedError(f"the MSGin5G server refused device {name!r}: {cause}")
        device = self._directory.learnable(self._name, name)
        if device is None:
            raise UnknownDeviceError(f"device {name!r} is not mapped on transport {self._name}")
        if await self._store.learn_device(self._name, device.name, device.service_id):
            log.info(
                "device.learned", transport=self._name, device=name, service_id=device.service_id
            )
        self._directory.learn(self._name, device)
        await self._on_learned(device)
        return device

    async def accept(self, uplink: Uplink) -> Acceptance:
        try:
            return await self._accept(uplink)
        except IntakeRefusedError as exc:
            if exc.permanent:
                await self.reject(
                    Rejection(
                        device=uplink.device,
                        reason=exc.reason,
                        detail=exc.detail,
                        content=uplink.payload,
                        msg_id=uplink.msg_id,
                    )
                )
            raise

    async def _accept(self, uplink: Uplink) -> Acceptance:
        # The message itself first: a bad one must not make the gateway learn a device.
        _check_text(uplink)
        if uplink.expiry is not None and uplink.expiry <= datetime.now(UTC):
            # Stored, it would only expire at the next sweep: refuse it now.
            raise InvalidMessageError(f"expiry {uplink.expiry.isoformat()} is in the past")
        device = await self._resolve(uplink.device)
        msg_id = uplink.msg_id or str(uuid.uuid4())
        with bound_message(msg_id, transport=self._name, device=device.name):
            dest = uplink.dest or await self._destination(uplink, device)
            message = UEMessageDelivery(
                ori_addr=Address.ue(device.service_id),
                dest_addr=dest,
                msg_id=msg_id,
                sto_and_fw_ind=True,
                app_id=uplink.app_id,
                deliv_st_req_ind=uplink.report_requested or None,
                payload=uplink.payload,
                expiry=uplink.expiry,
            )
            # One put, or one per segment when the payload is over relay.max_payload:
            # put_many stores all segments or none, all on the message's lane.
            pipeline = self.pipeline
            requests = segments.uplink_requests(
                message,
                dedup_key=uplink_key(device.service_id, msg_id),
                lane=device_lane(device.service_id, msg_id, pipeline),
                expires_at=uplink.expiry.timestamp() if uplink.expiry else None,
                size=self._relay.max_payload,
                max_segments=self._relay.max_segments,
            )
            (result, *_) = await self._store.put_many(Queue.UPLINK, requests)
            metrics.accepted("uplink", self._name, duplicate=result.duplicate)
            extra = {"segments": len(requests)} if len(requests) > 1 else {}
            log.debug(
                "message.received",
                direction="uplink",
                dest=str(dest),
                duplicate=result.duplicate,
                **extra,
            )
            return Acceptance(msg_id=msg_id, duplicate=result.duplicate)

    async def reject(self, rejection: Rejection) -> None:
        """Keep refused input in the DLQ (queue ``intake``), log it and count it.

        Everything stored or logged is made valid UTF-8 first: the input may be exactly
        the lone surrogate that got it refused. A redelivery of the same input (same
        transport, device, id and content) is recorded once.
        """
        reason, msg_id = rejection.reason, rejection.msg_id
        safe_device, safe_id = _printable(rejection.device), _printable(msg_id) if msg_id else None
        text = _printable(rejection.content)
        key_id = safe_id or uuid.uuid5(uuid.NAMESPACE_OID, f"{safe_device}\0{text}").hex
        record_id = safe_id or f"rejected-{key_id[:16]}"
        body = {
            "transport": self._name,
            "device": safe_device,
            "reason": reason,
            "detail": _printable(rejection.detail),
            "content": text[:REJECTED_CONTENT_MAX],
            "truncated": len(text) > REJECTED_CONTENT_MAX,
        }
        recorded = await self._store.put_rejected(
            msg_id=record_id,
            dedup_key=rejected_key(self._name, safe_device, key_id),
            lane=f"{self._name}:{safe_device}",
            reason=f"{reason}: {body['detail']}",
            body=body,
        )
        metrics.rejected(self._name, reason)
        # The one line per refused input: monitoring counts lines, so the transport that
        # answers the device logs the same refusal at debug at most. ``msg_id`` is the DLQ
        # record's: the input's own id when it had one.
        log.warning(
            "intake.rejected",
            transport=self._name,
            device=safe_device,
            msg_id=record_id,
            reason=reason,
            detail=body["detail"],
            recorded=recorded,
        )

    def peer_dropped(self, count: int, detail: str) -> None:
        metrics.peer_dropped(self._name, count)
        log.warning("transport.peer_dropped", transport=self._name, count=count, detail=detail)

    async def _destination(self, uplink: Uplink, device: Device) -> Address:
        route = await self._store.route(device.service_id)
        if route is not None:
            return Address.from_json(route)
        chosen = self._plugins.uplink_destination(uplink, device)
        if chosen is not None:
            return chosen
        if self._relay.default_destination is not None:
            return self._relay.default_destination
        raise InvalidMessageError(
            "the message names no destination, no reply route exists for the device, "
            "and relay.default_destination is not configured"
        )

    async def accept_report(self, report: DeviceReport) -> None:
        try:
            for name, value in (("msgId", report.msg_id), ("cause", report.cause or "")):
                if not value.isascii() and _printable(value) != value:
                    raise InvalidMessageError(f"{name} is not valid Unicode text")
            device = await self._resolve(report.device)
        except IntakeRefusedError as exc:
            # A report is no message: logged (the one line, as for a message) and
            # counted, not kept in the DLQ.
            if exc.permanent:
                metrics.rejected(self._name, exc.reason)
                log.warning(
                    "intake.rejected",
                    transport=self._name,
                    device=_printable(report.device),
                    msg_id=_printable(report.msg_id),
                    reason=exc.reason,
                    detail=exc.detail,
                    kind="report",
                )
            raise
        with bound_message(report.msg_id, transport=self._name, device=device.name):
            route = await self._store.route(device.service_id)
            if route is None:
                log.warning("report.unroutable", reason="no reply route for the device")
                return
            await put_report(
                self._store,
                device=device,
                origin=Address.from_json(route),
                msg_id=report.msg_id,
                delivered=report.delivered,
                cause=report.cause,
                pipeline=self.pipeline,
            )


def _check_text(uplink: Uplink) -> None:
    """Refuse strings that are not Unicode text (a lone surrogate from a JSON ``\\ud800``
    escape): they cannot be stored, logged or sent as UTF-8 (I-JSON, RFC 7493 2.1)."""
    fields = {
        "device": uplink.device,
        "msgId": uplink.msg_id,
        "appId": uplink.app_id,
        "payload": uplink.payload,
        "dest.addrType": uplink.dest.addr_type if uplink.dest else None,
        "dest.addr": uplink.dest.addr if uplink.dest else None,
    }
    for name, value in fields.items():
        if value is None or value.isascii():
            continue
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidMessageError(
                f"{name} is not valid Unicode text (a lone surrogate)"
            ) from None


def _printable(value: bytes | str | None) -> str:
    """``value`` as valid UTF-8 text: undecodable bytes and lone surrogates escaped."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value.encode("utf-8", "backslashreplace").decode()


async def put_report(
    store: Store,
    *,
    device: Device,
    origin: Address,
    msg_id: str,
    delivered: bool,
    cause: str | None,
    pipeline: int,
) -> None:
    """Queue a DeliveryStatusReport from a device about a message ``origin`` sent it."""
    request = report_request(
        device=device,
        origin=origin,
        msg_id=msg_id,
        delivered=delivered,
        cause=cause,
        pipeline=pipeline,
    )
    await store.put_many(Queue.REPORT, [request])
    metrics.report("queued")
    log.debug("report.queued", delivered=delivered, dest=str(origin))


class Dispatcher:
    """Handles the downlink queue: messages and reports on their way to devices."""

    def __init__(
        self,
        *,
        store: Store,
        directory: Directory,
        transports: dict[str, Transport],
        on_unknown: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._store = store
        self._directory = directory
        self._transports = transports
        # Several instances on a shared store: a device another instance learned may be
        # missing from this directory until it looks at the store again.
        self._on_unknown = on_unknown

    async def _endpoint(self, service_id: str) -> Endpoint | None:
        endpoint = self._directory.endpoint(service_id)
        if endpoint is None and self._on_unknown is not None:
            await self._on_unknown()
            endpoint = self._directory.endpoint(service_id)
        return endpoint

    async def handle(self, item: Item) -> Outcome:
        kind, wire = item.body["kind"], item.body["wire"]
        if kind == KIND_REPORT:
            return await self._report(DeliveryStatusReport.from_json(wire))
        message = GatewayMessageDelivery.from_json(wire)
        endpoint = await self._endpoint(message.dest_addr.addr)
        if endpoint is None:
            return Dead(f"UE Service ID {message.dest_addr.addr} is no longer mapped")
        transport = self._transports.get(endpoint.transport)
        if transport is None:
            return _transport_down(endpoint.transport)
        outcome = await transport.deliver(
            Downlink(
                msg_id=message.msg_id,
                device=endpoint.device,
                origin=message.ori_addr,
                payload=message.payload,
                app_id=message.app_id,
                report_requested=bool(message.deliv_st_req_ind),
            )
        )
        return await self._settle(message, endpoint, outcome)

    async def _settle(
        self, message: GatewayMessageDelivery, endpoint: Endpoint, outcome: DeliveryOutcome
    ) -> Outcome:
        if outcome.delivered:
            log.debug("message.delivered", direction="downlink", device=endpoint.device.name)
        elif not outcome.permanent:
            log.info("message.delivery_deferred", cause=outcome.cause)
            return Retry(outcome.cause or "delivery failed", peer_down=False)
        else:
            log.warning("message.delivery_failed", cause=outcome.cause)
        if message.deliv_st_req_ind:
            await put_report(
                self._store,
                device=endpoint.device,
                origin=message.ori_addr,
                msg_id=message.msg_id,
                delivered=outcome.delivered,
                cause=outcome.cause,
                pipeline=self._directory.pipeline(endpoint.device.service_id),
            )
        return Done() if outcome.delivered else Dead(outcome.cause or "delivery failed")

    async def _report(self, report: DeliveryStatusReport) -> Outcome:
        endpoint = await self._endpoint(report.dest_addr.addr)
        if endpoint is None:
            return Dead(f"UE Service ID {report.dest_addr.addr} is no longer mapped")
        transport = self._transports.get(endpoint.transport)
        if transport is None:
            return _transport_down(endpoint.transport)
        passed = await transport.deliver_report(
            UplinkReport(
                device=endpoint.device,
                msg_id=report.msg_id,
                delivered=report.delivered,
                cause=report.failure_cause,
            )
        )
        metrics.report("delivered" if passed else "not_carried")
        event = "report.delivered" if passed else "report.not_carried"
        log.debug(event, delivered=report.delivered)
        return Done()

    def expired_report(self, item: Item) -> tuple[Queue, PutRequest] | None:
        """The failure report an expired downlink message calls for, if its originator
        asked for one. Pure (no I/O): the store runs it inside the expiry transaction.

        An expired segment (its message never became whole) reports about the whole
        message; its set expires together and the report's dedup key keeps it to one.
        """
        if item.body.get("kind") != KIND_MESSAGE:
            return None
        message = GatewayMessageDelivery.from_json(item.body["wire"])
        endpoint = self._directory.endpoint(message.dest_addr.addr)
        if not message.deliv_st_req_ind or endpoint is None:
            return None
        return Queue.REPORT, report_request(
            device=endpoint.device,
            origin=message.ori_addr,
            msg_id=segments.whole_msg_id(message),
            delivered=False,
            cause="SEGMENTS_MISSING" if item.queue == Queue.SEGMENT else "EXPIRED",
            pipeline=self._directory.pipeline(endpoint.device.service_id),
        )

    def expiry_report(self, item: Item) -> tuple[Queue, PutRequest] | None:
        """The failure report for any expired item (see :meth:`Store.expire`), or ``None``."""
        if item.queue == Queue.UPLINK:
            message = UEMessageDelivery.from_json(item.body)
            pipeline = self._directory.pipeline(message.ori_addr.addr)
            request = _device_report(message, "EXPIRED", pipeline=pipeline)
            return None if request is None else (Queue.DOWNLINK, request)
        if item.queue in (Queue.DOWNLINK, Queue.SEGMENT):
            return self.expired_report(item)
        return None


def _transport_down(name: str) -> Outcome:
    # Restarting after a failure (see gatewayd.lifecycle): the item waits in the store.
    return Retry(f"transport {name} is restarting", peer_down=False)


def _device_report(message: UEMessageDelivery, cause: str, *, pipeline: int) -> PutRequest | None:
    """The failure report a device's uplink message calls for, if it asked to know;
    ``pipeline``: the device's transport's."""
    # A failed segment fails its whole message: the device hears of the msgId it sent.
    msg_id = segments.whole_msg_id(message)
    return device_report_request(message, cause, msg_id=msg_id, pipeline=pipeline)


async def put_device_report(
    store: Store, message: UEMessageDelivery, cause: str, *, pipeline: int
) -> None:
    """Tell a device that its uplink message failed for good, if it asked to know."""
    request = _device_report(message, cause, pipeline=pipeline)
    if request is not None:
        await store.put_many(Queue.DOWNLINK, [request])


class ExpirySweep:
    """Moves expired items to the DLQ and stores the failure reports they call for.

    The failure report of an expired item is stored in the same transaction as the
    expiry: a full disk delays both (the items stay pending), a crash loses neither.
    ``clock`` is the wall clock the store compares ``expires_at`` with (injectable).
    """

    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        *,
        interval: float = EXPIRY_SWEEP_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self.interval = interval
        self._clock = clock
        self.deferred = False  # the last sweep could not write (a full or failing disk)

    async def sweep(self, now: float | None = None) -> list[Item]:
        """One pass as of ``now`` (the clock's time by default); a full or failing disk
        defers it (logged once) instead of raising."""
        at = self._clock() if now is None else now
        # Which expiries queued a report for the server, noted as the store builds them
        # (in its transaction, on the writer thread; read here once it committed).
        for_server: dict[int, bool] = {}

        def report(item: Item) -> tuple[Queue, PutRequest] | None:
            built = self._dispatcher.expiry_report(item)
            for_server[item.id] = built is not None and built[0] == Queue.REPORT
            return built

        try:
            if self._store.refusing is not None:
                await self._store.probe()  # ends the refusal once space is back
            expired = await self._store.expire(at, report=report)
            metrics.expired(expired)
            for item in expired:
                with bound_message(item.msg_id, queue=str(item.queue)):
                    log.warning("message.expired", to="dead-letter queue")
                    if for_server.get(item.id, False):
                        metrics.report("queued")
                        log.info("report.queued", delivered=False, cause="EXPIRED")
            await self._store.prune(at)
        except (IntakeRefusedError, StoreError) as exc:
            # A full or failing disk must not stop the gateway: sweep again later.
            if not self.deferred:
                log.warning("expiry.deferred", error=str(exc))
            self.deferred = True
            return []
        self.deferred = False
        return expired

    async def run(self) -> None:
        while True:
            await self.sweep()
            await asyncio.sleep(self.interval)
