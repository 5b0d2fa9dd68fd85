"""What the reference server remembers: registrations, messages, reports, pushes.

Each record keeps the raw JSON body next to the parsed wire type, so tests can check the
exact bytes' content against the OpenAPI schemas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gatewayd.msgin5g import DeliveryStatusReport, GatewayType, UEMessageDelivery

_DELIVERY_API = {
    GatewayType.N3G.value: "msgg-n3gdelivery/v1",
    GatewayType.L3G.value: "msgg-l3gdelivery/v1",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """A live gateway registration, as granted."""

    registration_id: str
    gw_id: str
    gw_type: str
    target_uri: str
    ue_svc_ids: tuple[str, ...]
    expiry: datetime
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def delivery_root(self) -> str:
        """The gateway's MSGG_{N3G,L3G}Delivery root: its registered apiRoot + API path."""
        return (
            f"{self.target_uri.rstrip('/')}/{_DELIVERY_API.get(self.gw_type, _DELIVERY_API['N3G'])}"
        )

    def live(self, now: datetime) -> bool:
        return now < self.expiry

    def to_json(self) -> dict[str, Any]:
        return {
            "registrationId": self.registration_id,
            "gwId": self.gw_id,
            "gwType": self.gw_type,
            "targetUri": self.target_uri,
            "ueSvcIds": list(self.ue_svc_ids),
            "expiry": self.expiry.isoformat(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class UplinkRecord:
    """A UE message a gateway delivered (recorded once per (gateway, originator, msgId))."""

    gw_id: str
    message: UEMessageDelivery
    raw: Mapping[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"gwId": self.gw_id, "body": dict(self.raw)}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportRecord:
    """A delivery status report a gateway sent about a downlink message."""

    gw_id: str
    report: DeliveryStatusReport
    raw: Mapping[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"gwId": self.gw_id, "body": dict(self.raw)}


@dataclass(frozen=True, slots=True, kw_only=True)
class PushResult:
    """The outcome of a request the server made to a gateway (downlink or report).

    ``status`` is the HTTP status, or 0 when no HTTP exchange happened (unreachable,
    TLS refused, wrong identity); ``error`` then says why.
    """

    kind: str  # "deliver-message" or "deliver-report"
    msg_id: str
    gw_id: str | None
    status: int
    body: Mapping[str, Any] = field(repr=False)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 204

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "msgId": self.msg_id,
            "gwId": self.gw_id,
            "status": self.status,
        }
        if self.error:
            out["error"] = self.error
        return out
