"""Turns device messages into MSGin5G messages and back (TS 23.554 clauses 8.5-8.7).

- identity mapping: device on a transport <-> UE Service ID (:class:`Directory`);
- reply routing: a device's reply without a destination goes to whoever last wrote to it;
- delivery reports: built from transport evidence when ``delivStReqInd`` asked for one.

Segmentation is not done here yet: a payload over ``relay.max_payload`` is refused at
intake with a precise reason rather than cut.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gatewayd import metrics
from gatewayd.api import (
    Acceptance,
    CredentialBackend,
    DeliveryOutcome,
    Device,
    DeviceReport,
    Downlink,
    InvalidMessageError,
    Transport,
    TransportSettings,
    UnknownDeviceError,
    Uplink,
    UplinkReport,
)
from gatewayd.config import RelaySettings
from gatewayd.log import bound_message
from gatewayd.msgin5g.model import (
    Address,
    DeliveryStatusReport,
    GatewayMessageDelivery,
    ReportDeliveryStatus,
    UEMessageDelivery,
)
from gatewayd.plugins import Plugins
from gatewayd.store import Item, Queue, Store
from gatewayd.worker import Dead, Done, Outcome, Retry

log = structlog.get_logger(__name__)

# Downlink queue bodies carry one of two things for a device, in one ordered lane.
KIND_MESSAGE = "message"
KIND_REPORT = "report"


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
        for t in transports:
            for d in t.devices:
                self._add(t.name, d)

    def reconfigure(self, transports: tuple[TransportSettings, ...]) -> None:
        """New transport tables (SIGHUP): the configured devices only; the caller
        learns the learned ones again."""
        fresh = Directory(transports)
        self._by_device, self._by_service = fresh._by_device, fresh._by_service
        self._templates = fresh._templates

    def _add(self, transport: str, device: Device) -> None:
        self._by_device[(transport, device.name)] = device
        self._by_service[device.service_id] = Endpoint(transport, device)

    def device(self, transport: str, name: str) -> Device | None:
        return self._by_device.get((transport, name))

    def endpoint(self, service_id: str) -> Endpoint | None:
        return self._by_service.get(service_id)

    def learnable(self, transport: str, name: str) -> Device | None:
        """The device a template would admit, or ``None`` when the transport has none."""
        template = self._templates.get(transport)
        if template is None:
            return None
        return Device(name=name, service_id=template.format(device=name))

    def learn(self, transport: str, device: Device) -> None:
        self._add(transport, device)

    def service_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_service))


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

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        return self._log  # type: ignore[no-any-return]

    def credentials(self, name: str) -> CredentialBackend:
        return self._credentials(name)

    def device(self, name: str) -> Device | None:
        return self._directory.device(self._name, name)

    async def _resolve(self, name: str) -> Device:
        device = self._directory.device(self._name, name)
        if device is not None:
            return device
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
        device = await self._resolve(uplink.device)
        msg_id = uplink.msg_id or str(uuid.uuid4())
        with bound_message(msg_id, transport=self._name, device=device.name):
            if (
                uplink.payload is not None
                and len(uplink.payload.encode()) > self._relay.max_payload
            ):
                raise InvalidMessageError(
                    f"payload is {len(uplink.payload.encode())} bytes; "
                    f"the limit (relay.max_payload) is {self._relay.max_payload}"
                )
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
            result = await self._store.put(
                Queue.UPLINK,
                msg_id=msg_id,
                dedup_key=f"up:{device.service_id}:{msg_id}",
                lane=device.service_id,
                body=message.to_json(),
                expires_at=uplink.expiry.timestamp() if uplink.expiry else None,
            )
            metrics.accepted("uplink", self._name, duplicate=result.duplicate)
            log.info(
                "message.received", direction="uplink", dest=str(dest), duplicate=result.duplicate
            )
            return Acceptance(msg_id=msg_id, duplicate=result.duplicate)

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
        device = await self._resolve(report.device)
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
            )


def downlink_body(kind: str, wire: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "wire": wire}


async def put_report(
    store: Store,
    *,
    device: Device,
    origin: Address,
    msg_id: str,
    delivered: bool,
    cause: str | None,
) -> None:
    """Queue a DeliveryStatusReport from a device about a message ``origin`` sent it."""
    report = DeliveryStatusReport(
        ori_addr=Address.ue(device.service_id),
        dest_addr=origin,
        msg_id=msg_id,
        deliv_st=ReportDeliveryStatus.REPT_DELY_SUCCESS
        if delivered
        else ReportDeliveryStatus.REPT_DELY_FAILED,
        failure_cause=None if delivered else (cause or "delivery failed"),
    )
    await store.put(
        Queue.REPORT,
        msg_id=msg_id,
        dedup_key=f"report:{device.service_id}:{origin}:{msg_id}",
        lane=device.service_id,
        body=report.to_json(),
    )
    metrics.report("queued")
    log.info("report.queued", delivered=delivered, dest=str(origin))


class Dispatcher:
    """Handles the downlink queue: messages and reports on their way to devices."""

    def __init__(
        self,
        *,
        store: Store,
        directory: Directory,
        transports: dict[str, Transport],
    ) -> None:
        self._store = store
        self._directory = directory
        self._transports = transports

    async def handle(self, item: Item) -> Outcome:
        kind, wire = item.body["kind"], item.body["wire"]
        if kind == KIND_REPORT:
            return await self._report(DeliveryStatusReport.from_json(wire))
        message = GatewayMessageDelivery.from_json(wire)
        endpoint = self._directory.endpoint(message.dest_addr.addr)
        if endpoint is None:
            return Dead(f"UE Service ID {message.dest_addr.addr} is no longer mapped")
        outcome = await self._transports[endpoint.transport].deliver(
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
            log.info("message.delivered", direction="downlink", device=endpoint.device.name)
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
            )
        return Done() if outcome.delivered else Dead(outcome.cause or "delivery failed")

    async def _report(self, report: DeliveryStatusReport) -> Outcome:
        endpoint = self._directory.endpoint(report.dest_addr.addr)
        if endpoint is None:
            return Dead(f"UE Service ID {report.dest_addr.addr} is no longer mapped")
        passed = await self._transports[endpoint.transport].deliver_report(
            UplinkReport(
                device=endpoint.device,
                msg_id=report.msg_id,
                delivered=report.delivered,
                cause=report.failure_cause,
            )
        )
        metrics.report("delivered" if passed else "not_carried")
        log.info("report.delivered" if passed else "report.not_carried", delivered=report.delivered)
        return Done()

    async def expired(self, item: Item) -> None:
        """An expired downlink message: a failure report to its originator, if asked for."""
        if item.body.get("kind") != KIND_MESSAGE:
            return
        message = GatewayMessageDelivery.from_json(item.body["wire"])
        endpoint = self._directory.endpoint(message.dest_addr.addr)
        if message.deliv_st_req_ind and endpoint is not None:
            await put_report(
                self._store,
                device=endpoint.device,
                origin=message.ori_addr,
                msg_id=message.msg_id,
                delivered=False,
                cause="EXPIRED",
            )


async def put_device_report(store: Store, message: UEMessageDelivery, cause: str) -> None:
    """Tell a device that its uplink message failed for good, if it asked to know.

    The report travels the device's downlink lane, so it is as durable as a message and
    arrives in order with them.
    """
    if not message.deliv_st_req_ind:
        return
    report = DeliveryStatusReport(
        ori_addr=message.dest_addr,
        dest_addr=message.ori_addr,
        msg_id=message.msg_id,
        deliv_st=ReportDeliveryStatus.REPT_DELY_FAILED,
        failure_cause=cause,
    )
    await store.put(
        Queue.DOWNLINK,
        msg_id=message.msg_id,
        dedup_key=f"report-local:{message.ori_addr}:{message.msg_id}",
        lane=message.ori_addr.addr,
        body=downlink_body(KIND_REPORT, report.to_json()),
    )
