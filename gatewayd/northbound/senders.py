"""Handlers that send the uplink and report queues to the MSGin5G Server."""

from __future__ import annotations

import structlog

from gatewayd.errors import (
    DeviceRefusedError,
    PeerRefusedError,
    PeerUnavailableError,
    ProtocolError,
    RequestRejectedError,
)
from gatewayd.msgin5g.model import DeliveryStatus, DeliveryStatusReport, UEMessageDelivery
from gatewayd.msgin5g.registration import CAUSE_NOT_REGISTERED
from gatewayd.northbound.client import MsgsClient
from gatewayd.northbound.registration import Registrar
from gatewayd.relay import Directory, put_device_report
from gatewayd.store import Item, Store
from gatewayd.worker import Dead, Done, Outcome, Retry

log = structlog.get_logger(__name__)

# The reference server's cause for a request from a gateway it holds no registration of
# (our registration extension): the message is fine, the registration must be renewed.


# The server's cause for an originator not in the gateway's registration.
CAUSE_SERVICE_ID_NOT_ALLOWED = "SERVICE_ID_NOT_ALLOWED"
# With a shared store, how many times such a refusal sends the registration again before
# the message is taken as refused for good.
SHARED_DRIFT_RETRIES = 3


class Senders:
    def __init__(
        self,
        client: MsgsClient,
        registrar: Registrar,
        store: Store,
        directory: Directory,
        *,
        shared: bool = False,
    ) -> None:
        self._client = client
        self._registrar = registrar
        self._store = store
        self._directory = directory  # for the lane of a failure report to a device
        # Several instances keep one registration: another may have replaced it with one
        # that lacks a device this instance registered a moment ago (their first
        # registrations raced). The server's "not a UE you registered" is then drift.
        self._shared = shared

    async def uplink(self, item: Item) -> Outcome:
        message = UEMessageDelivery.from_json(item.body)
        # A learned device must be registered before its first message leaves.
        try:
            await self._registrar.ensure(message.ori_addr.addr)
        except DeviceRefusedError as exc:
            # The server will not serve this device: its message cannot go anywhere.
            log.warning("message.rejected", cause="DEVICE_REFUSED", detail=exc.detail)
            await self._device_report(message, "DEVICE_REFUSED")
            return Dead(exc.detail)
        try:
            ack = await self._client.deliver_ue_message(message)
        except RequestRejectedError as exc:
            if exc.cause == CAUSE_NOT_REGISTERED or self._drifted(exc, item):
                return self._registration_lost(exc)
            log.warning("message.rejected", status=exc.status, cause=exc.cause, detail=exc.detail)
            await self._device_report(message, exc.cause or f"HTTP {exc.status}")
            return Dead(str(exc))
        except (PeerUnavailableError, PeerRefusedError, ProtocolError) as exc:
            return _transient(exc)
        if ack.status == DeliveryStatus.DELY_FAILED:
            log.warning("message.rejected", status=ack.status, cause=ack.failure_cause)
            await self._device_report(message, ack.failure_cause or "DELY_FAILED")
            return Dead(f"server answered DELY_FAILED: {ack.failure_cause}")
        log.debug(
            "message.forwarded",
            direction="uplink",
            status=ack.status,
            attempts=item.attempts + 1,
        )
        return Done()

    async def report(self, item: Item) -> Outcome:
        report = DeliveryStatusReport.from_json(item.body)
        try:
            await self._client.deliver_report(report)
        except RequestRejectedError as exc:
            if exc.cause == CAUSE_NOT_REGISTERED:
                return self._registration_lost(exc)
            log.warning("report.rejected", status=exc.status, cause=exc.cause)
            return Dead(str(exc))
        except (PeerUnavailableError, PeerRefusedError, ProtocolError) as exc:
            return _transient(exc)
        log.debug("report.sent", delivered=report.delivered, dest=str(report.dest_addr))
        return Done()

    async def _device_report(self, message: UEMessageDelivery, cause: str) -> None:
        pipeline = self._directory.pipeline(message.ori_addr.addr)
        await put_device_report(self._store, message, cause, pipeline=pipeline)

    def _drifted(self, exc: RequestRejectedError, item: Item) -> bool:
        """With a shared store, "not a UE you registered" for a device this instance
        registered: another instance's registration replaced ours. Register again with
        every instance's devices and retry (a device the server really refuses is then
        refused by that registration, DEVICE_REFUSED); a few times, not forever."""
        return (
            self._shared
            and exc.cause == CAUSE_SERVICE_ID_NOT_ALLOWED
            and item.attempts < SHARED_DRIFT_RETRIES
        )

    def _registration_lost(self, exc: RequestRejectedError) -> Retry:
        # A server that restarted without our registration refuses everything until we
        # register again; sending the backlog to the DLQ for that would be wrong.
        log.warning("registration.lost", status=exc.status, cause=exc.cause)
        self._registrar.lost()
        # The server answered: it is up. Closing the breaker now lets the backlog flow
        # as soon as the re-registration holds, instead of one more reset timeout later.
        return Retry(str(exc), peer_down=False, answered=True)


def _transient(exc: Exception) -> Retry:
    # A refused TLS handshake is no blip, but the message must not be lost: it waits in
    # the store while the circuit breaker keeps probing at a falling rate.
    retry_after = exc.retry_after if isinstance(exc, PeerUnavailableError) else None
    return Retry(str(exc), after=retry_after)
