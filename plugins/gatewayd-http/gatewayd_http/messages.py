"""The JSON bodies of the device-facing API, in both directions.

Parsing raises :class:`Problem` (400) naming the offending member, so a device
developer sees what to fix. Unknown members are ignored: devices may send newer
fields than this gateway knows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gatewayd.api import Address, DeviceReport, Downlink, Uplink, UplinkReport
from gatewayd_http.problems import Problem


def parse_uplink(device: str, data: object) -> Uplink:
    """``POST /v1/devices/{device}/messages`` -> :class:`Uplink`."""
    body = _object(data, "the body")
    payload = body.get("payload")
    if not isinstance(payload, str):
        raise _invalid("payload", "is required and must be a string")
    return Uplink(
        device=device,
        payload=payload,
        msg_id=_opt_str(body, "msgId"),
        dest=_opt_address(body, "dest"),
        app_id=_opt_str(body, "appId"),
        report_requested=_opt_bool(body, "deliveryReport") or False,
        expiry=_opt_time(body, "expiry"),
    )


def parse_report(device: str, data: object) -> DeviceReport:
    """``POST /v1/devices/{device}/reports`` -> :class:`DeviceReport`."""
    body = _object(data, "the body")
    msg_id = _opt_str(body, "msgId")
    if msg_id is None:
        raise _invalid("msgId", "is required")
    delivered = _opt_bool(body, "delivered")
    if delivered is None:
        raise _invalid("delivered", "is required (true or false)")
    return DeviceReport(
        device=device, msg_id=msg_id, delivered=delivered, cause=_opt_str(body, "cause")
    )


def downlink_body(message: Downlink) -> dict[str, Any]:
    """What a device's webhook receives for a downlink message."""
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
    return body


def report_body(report: UplinkReport) -> dict[str, Any]:
    """What a device's webhook receives when the server reports on a message it sent."""
    return {
        "type": "report",
        "msgId": report.msg_id,
        "delivered": report.delivered,
        "cause": report.cause,
    }


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Problem(400, f"{what} must be a JSON object")
    return value


def _invalid(member: str, problem: str) -> Problem:
    return Problem(400, f"{member}: {problem}")


def _opt_str(body: dict[str, Any], member: str) -> str | None:
    value = body.get(member)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _invalid(member, "must be a non-empty string")
    return value


def _opt_bool(body: dict[str, Any], member: str) -> bool | None:
    value = body.get(member)
    if value is None or isinstance(value, bool):
        return value
    raise _invalid(member, "must be true or false")


def _opt_address(body: dict[str, Any], member: str) -> Address | None:
    value = body.get(member)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(member, 'must be an object {"addrType", "addr"}')
    addr_type, addr = value.get("addrType"), value.get("addr")
    # addrType is an open enumeration in TS 29.538: any non-empty string passes.
    if not isinstance(addr_type, str) or not addr_type:
        raise _invalid(f"{member}.addrType", "must be a non-empty string")
    if not isinstance(addr, str) or not addr:
        raise _invalid(f"{member}.addr", "must be a non-empty string")
    return Address(addr_type, addr)


def _opt_time(body: dict[str, Any], member: str) -> datetime | None:
    text = _opt_str(body, member)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _invalid(member, f"is not an RFC 3339 date-time: {text!r}") from None
    if value.tzinfo is None:
        raise _invalid(member, "needs a time zone offset (RFC 3339), e.g. 'Z'")
    return value
