"""Payload formats on the device side, and the message ids derived from MQTT packets.

Two formats (``format = "raw" | "json"``), documented in ``docs/transports/mqtt.md``:

- **raw**: the MQTT payload is the message. It becomes the MSGin5G string payload by
  :func:`encode_raw`; a downlink string goes back to bytes by :func:`decode_raw`.
- **json**: a UTF-8 JSON object, the *envelope*, carrying MSGin5G fields.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gatewayd.api import Address, Downlink, UplinkReport

RAW_BASE64_PREFIX = "data:application/octet-stream;base64,"
"""Marks a raw payload carried as base64 (an RFC 2397 data URL prefix)."""

MAX_MSG_ID = 256


class PayloadError(ValueError):
    """A device payload that cannot become a message; ``reason`` is a stable log value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode_raw(data: bytes) -> str:
    """Raw bytes -> the MSGin5G string payload.

    Valid UTF-8 travels as that text, unchanged. Anything else, and text that itself
    starts with :data:`RAW_BASE64_PREFIX` (so the rule stays reversible), becomes the
    prefix followed by standard base64 with padding.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.startswith(RAW_BASE64_PREFIX):
        return text
    return RAW_BASE64_PREFIX + base64.b64encode(data).decode("ascii")


def decode_raw(text: str) -> bytes:
    """The MSGin5G string payload -> raw bytes: the exact inverse of :func:`encode_raw`.

    A prefixed string whose remainder is not valid base64 is sent as the text it is.
    """
    if text.startswith(RAW_BASE64_PREFIX):
        try:
            return base64.b64decode(text[len(RAW_BASE64_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return text.encode("utf-8")


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """The MSGin5G fields of a JSON uplink envelope."""

    payload: str | None
    msg_id: str | None = None
    app_id: str | None = None
    report_requested: bool = False
    dest: Address | None = None
    expiry: datetime | None = None


def _object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError("not_json", str(exc)) from None
    if not isinstance(value, dict):
        raise PayloadError("not_an_object", "the JSON payload must be an object")
    return value


def _opt_str(obj: dict[str, Any], key: str, limit: int | None = None) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise PayloadError("bad_field", f"{key} must be a non-empty string")
    if limit is not None and len(value) > limit:
        raise PayloadError("bad_field", f"{key} is longer than {limit} characters")
    return value


def parse_envelope(data: bytes) -> Envelope:
    """Read a JSON uplink envelope. Unknown keys are ignored (forward compatibility)."""
    obj = _object(data)
    payload = obj.get("payload")
    if payload is not None and not isinstance(payload, str):
        raise PayloadError("bad_field", "payload must be a string")
    report = obj.get("delivStReqInd", obj.get("deliveryReport", False))
    if not isinstance(report, bool):
        raise PayloadError("bad_field", "delivStReqInd must be true or false")
    return Envelope(
        payload=payload,
        msg_id=_opt_str(obj, "msgId", MAX_MSG_ID),
        app_id=_opt_str(obj, "appId"),
        report_requested=report,
        dest=_address(obj.get("dest")),
        expiry=_datetime(obj.get("expiry")),
    )


def _address(value: object) -> Address | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PayloadError("bad_field", 'dest must be an object {"addrType": .., "addr": ..}')
    kind, addr = value.get("addrType"), value.get("addr")
    if not isinstance(kind, str) or not isinstance(addr, str) or not kind or not addr:
        raise PayloadError("bad_field", "dest needs string addrType and addr")
    return Address(kind, addr)


def _datetime(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError("bad_field", "expiry must be an RFC 3339 date-time string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PayloadError("bad_field", "expiry must be an RFC 3339 date-time string") from None
    if parsed.tzinfo is None:
        raise PayloadError("bad_field", "expiry needs a time zone offset")
    return parsed


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportFields:
    """A device's own report on a downlink message (device -> gateway)."""

    msg_id: str
    delivered: bool
    cause: str | None = None


def parse_device_report(data: bytes) -> ReportFields:
    """``{"msgId": "...", "delivered": true|false, "cause": "..."}``."""
    obj = _object(data)
    msg_id = _opt_str(obj, "msgId", MAX_MSG_ID)
    delivered = obj.get("delivered")
    if msg_id is None or not isinstance(delivered, bool):
        raise PayloadError("bad_field", "a report needs msgId (string) and delivered (boolean)")
    return ReportFields(msg_id=msg_id, delivered=delivered, cause=_opt_str(obj, "cause"))


def downlink_json(message: Downlink) -> bytes:
    """The JSON envelope of a downlink message."""
    body: dict[str, Any] = {
        "msgId": message.msg_id,
        "payload": message.payload,
        "origin": {"addrType": message.origin.addr_type, "addr": message.origin.addr},
    }
    if message.app_id is not None:
        body["appId"] = message.app_id
    if message.report_requested:
        body["delivStReqInd"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def report_json(report: UplinkReport) -> bytes:
    """The server's report on an uplink message, as the device receives it."""
    body: dict[str, Any] = {"msgId": report.msg_id, "delivered": report.delivered}
    if report.cause is not None:
        body["cause"] = report.cause
    return json.dumps(body, separators=(",", ":")).encode()


def derived_msg_id(topic: str, mid: int, payload: bytes) -> str:
    """A message id for a QoS > 0 PUBLISH that carries none of its own.

    A broker resends an unacknowledged PUBLISH with its original packet id (MQTT 3.1.1
    4.4, MQTT 5 4.4) and the same topic and payload, so the id is the same on
    redelivery and the core stores it once. The dup flag is left out on purpose: it is
    the one thing that differs. Limits (documented): packet ids are reused once acked,
    so two identical payloads on one topic 65535 packets apart collide; and a device
    that resends its own PUBLISH produces a new packet id, hence a new id. Devices that
    need end-to-end de-duplication send a ``msgId``.
    """
    digest = hashlib.sha256()
    for part in (topic.encode(), str(mid).encode(), payload):
        digest.update(len(part).to_bytes(8, "big"))  # length-prefixed: no ambiguity
        digest.update(part)
    return "mqtt-" + digest.hexdigest()[:32]
