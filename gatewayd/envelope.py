"""What the message path stores: queue bodies, dedup keys and reports, in one place.

- Downlink queue bodies carry one of two things for a device, in one ordered lane:
  ``{"kind": "message" | "report", "wire": <TS 29.538 JSON>}``. Uplink and report
  queue bodies are the wire JSON itself.
- Dedup keys say who may not store the same thing twice: a resend by the same
  originator with the same ``msgId`` is a duplicate; the prefix keeps directions and
  kinds apart in one queue.
- Reports: a device's report for the server (:func:`report_request`) and the gateway's
  own failure report to a device (:func:`device_report_request`).
- Lanes: every message and report of a device is stored on the lane
  :func:`device_lane` gives; :func:`lane_service_id` maps a lane back to its device.

Segment sets have their own keys in :mod:`gatewayd.segments`, which stores its bodies
through :func:`downlink_body`; this module does not import it (the segment rules, such as
which ``msgId`` a report about a segment carries, come in from the caller).
"""

from __future__ import annotations

import zlib
from typing import Any

from gatewayd.api import Device
from gatewayd.msgin5g.model import (
    Address,
    DeliveryStatusReport,
    GatewayMessageDelivery,
    ReportDeliveryStatus,
    UEMessageDelivery,
)
from gatewayd.store import PutRequest

KIND_MESSAGE = "message"
KIND_REPORT = "report"


def downlink_body(kind: str, wire: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "wire": wire}


# --- dedup keys ------------------------------------------------------------------------


def uplink_key(service_id: str, msg_id: str) -> str:
    return f"up:{service_id}:{msg_id}"


def downlink_key(origin: Address, msg_id: str) -> str:
    return f"down:{origin}:{msg_id}"


def report_in_key(origin: Address, msg_id: str) -> str:
    """A report from the server about a device's uplink message."""
    return f"report-in:{origin}:{msg_id}"


def report_key(service_id: str, origin: Address, msg_id: str) -> str:
    """A device's report for the server about ``origin``'s message."""
    return f"report:{service_id}:{origin}:{msg_id}"


def report_local_key(device: Address, msg_id: str) -> str:
    """The gateway's own failure report to a device about its uplink message."""
    return f"report-local:{device}:{msg_id}"


def rejected_key(transport: str, device: str, key_id: str) -> str:
    return f"rejected:{transport}:{device}:{key_id}"


# --- lanes --------------------------------------------------------------------------


def device_lane(service_id: str, msg_id: str, pipeline: int) -> str:
    """The lane of a device's message (or report) ``msg_id`` (``transports.NAME.pipeline``).

    With ``pipeline`` 1 the device's one lane, its UE Service ID: one item in flight, in
    the order accepted. Above 1, one of ``pipeline`` sub-lanes ``"<service_id>|<n>"``
    picked from the ``msgId`` alone (no state): up to ``pipeline`` in flight at once, in
    no particular order. Computed once per message, so all segments of one share a lane.
    """
    if pipeline == 1:
        return service_id
    spread = zlib.crc32(msg_id.encode("utf-8", "surrogatepass")) % pipeline
    return f"{service_id}|{spread}"


def lane_service_id(lane: str) -> str:
    """The UE Service ID of a device lane, a sub-lane (:func:`device_lane`) or a segment
    set's lane (``"<service_id>|<origin>|<segId>"``, :mod:`gatewayd.segments`)."""
    return lane.split("|", 1)[0]


# --- requests --------------------------------------------------------------------------


def downlink_request(
    message: GatewayMessageDelivery, service_id: str, *, pipeline: int
) -> PutRequest:
    """A message from the server for the device ``service_id``, for the downlink queue."""
    key = downlink_key(message.ori_addr, message.msg_id)
    lane = device_lane(service_id, message.msg_id, pipeline)
    return _for_device(KIND_MESSAGE, message.to_json(), message.msg_id, key, lane)


def report_in_request(
    report: DeliveryStatusReport, service_id: str, *, pipeline: int
) -> PutRequest:
    """A report from the server for the device ``service_id``, for the downlink queue."""
    key = report_in_key(report.ori_addr, report.msg_id)
    lane = device_lane(service_id, report.msg_id, pipeline)
    return _for_device(KIND_REPORT, report.to_json(), report.msg_id, key, lane)


def _for_device(kind: str, wire: dict[str, Any], msg_id: str, key: str, lane: str) -> PutRequest:
    # The device's lane: with pipeline 1, messages and reports for one device leave in
    # arrival order.
    return PutRequest(msg_id=msg_id, dedup_key=key, lane=lane, body=downlink_body(kind, wire))


def report_request(
    *,
    device: Device,
    origin: Address,
    msg_id: str,
    delivered: bool,
    cause: str | None,
    pipeline: int,
) -> PutRequest:
    """A DeliveryStatusReport from a device about a message ``origin`` sent it, for the
    report queue (``pipeline``: the device's transport's)."""
    report = DeliveryStatusReport(
        ori_addr=Address.ue(device.service_id),
        dest_addr=origin,
        msg_id=msg_id,
        deliv_st=ReportDeliveryStatus.REPT_DELY_SUCCESS
        if delivered
        else ReportDeliveryStatus.REPT_DELY_FAILED,
        failure_cause=None if delivered else (cause or "delivery failed"),
    )
    return PutRequest(
        msg_id=msg_id,
        dedup_key=report_key(device.service_id, origin, msg_id),
        lane=device_lane(device.service_id, msg_id, pipeline),
        body=report.to_json(),
    )


def device_report_request(
    message: UEMessageDelivery, cause: str, *, msg_id: str, pipeline: int
) -> PutRequest | None:
    """The failure report about ``msg_id`` for a device's uplink message, if it asked to
    know (for a segment: the whole message's, :func:`gatewayd.segments.whole_msg_id`).

    The report travels the device's downlink lane, so it is as durable as a message and
    (with ``pipeline`` 1) arrives in order with them.
    """
    if not message.deliv_st_req_ind:
        return None
    report = DeliveryStatusReport(
        ori_addr=message.dest_addr,
        dest_addr=message.ori_addr,
        msg_id=msg_id,
        deliv_st=ReportDeliveryStatus.REPT_DELY_FAILED,
        failure_cause=cause,
    )
    return PutRequest(
        msg_id=msg_id,
        dedup_key=report_local_key(message.ori_addr, msg_id),
        lane=device_lane(message.ori_addr.addr, msg_id, pipeline),
        body=downlink_body(KIND_REPORT, report.to_json()),
    )
