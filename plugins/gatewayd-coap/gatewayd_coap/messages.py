"""The JSON bodies devices exchange with the coap transport, in both directions.

The same shapes as the http transport's, so a device can switch between them. Parsing
raises :class:`BadRequest` naming the member, sent back as a CoAP diagnostic payload.
"""

from __future__ import annotations

import json
from typing import Any

from gatewayd.api import DeviceReport, Downlink, Uplink, UplinkReport


class BadRequest(Exception):
    """A body the transport refuses with 4.00; the text is the diagnostic payload."""


def _object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest("the body is not JSON (UTF-8)") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _opt(body: dict[str, Any], member: str, kind: type) -> Any:
    value = body.get(member)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"{member} must be a {kind.__name__}")
    return value


def parse_uplink(device: str, raw: bytes) -> Uplink:
    body = _object(raw)
    payload = body.get("payload")
    if not isinstance(payload, str):
        raise BadRequest("payload is required and must be a string")
    return Uplink(
        device=device,
        payload=payload,
        msg_id=_opt(body, "msgId", str),
        app_id=_opt(body, "appId", str),
        report_requested=bool(_opt(body, "deliveryReport", bool)),
    )


def parse_report(device: str, raw: bytes) -> DeviceReport:
    body = _object(raw)
    msg_id = _opt(body, "msgId", str)
    delivered = _opt(body, "delivered", bool)
    if msg_id is None or delivered is None:
        raise BadRequest("msgId (string) and delivered (true/false) are required")
    return DeviceReport(
        device=device, msg_id=msg_id, delivered=delivered, cause=_opt(body, "cause", str)
    )


def downlink_body(message: Downlink) -> bytes:
    body: dict[str, Any] = {
        "type": "message",
        "msgId": message.msg_id,
        "from": {"addrType": message.origin.addr_type, "addr": message.origin.addr},
        "payload": message.payload,
    }
    if message.app_id is not None:
        body["appId"] = message.app_id
    if message.report_requested:
        body["deliveryReport"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def report_body(report: UplinkReport) -> bytes:
    body = {"type": "report", "msgId": report.msg_id, "delivered": report.delivered}
    if report.cause is not None:
        body["cause"] = report.cause
    return json.dumps(body, separators=(",", ":")).encode()
