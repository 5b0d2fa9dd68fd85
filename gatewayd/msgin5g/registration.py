"""gatewayd's registration extension: a gateway registers on behalf of its devices.

TS 23.554 clauses 8.2.3/8.2.4 describe Non-MSGin5G UE (de-)registration through a
gateway, but TS 29.538 Rel-18 defines no resource for it. This is our extension,
``MSGS_GWRegistration`` (``{apiRoot}/msgs-gwregistration/v1``), modelled on
``MSGS_ASRegistration``; kits/gatewayd-sim/gatewayd_sim/openapi/MSGS_GWRegistration.yaml
(package data of gatewayd-sim) is its contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from gatewayd.errors import InvalidBodyError
from gatewayd.msgin5g import fields as f
from gatewayd.msgin5g.model import _compact, format_datetime

API_NAME = "msgs-gwregistration"
API_VERSION = "v1"

# The ProblemDetails cause with which a server answers MSGS_MSGDelivery calls from a
# gateway that holds no live registration: register again, then retry.
CAUSE_NOT_REGISTERED = "GATEWAY_NOT_REGISTERED"


class GatewayType(StrEnum):
    L3G = "L3G"
    N3G = "N3G"


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayRegistration:
    """``GatewayRegistration``: who the gateway is, where to reach it, whom it serves."""

    gw_id: str
    gw_type: str
    target_uri: str
    ue_svc_ids: tuple[str, ...]
    expiry: datetime | None = None  # requested; the server may grant less

    @classmethod
    def from_json(cls, value: object) -> Self:
        data = f.obj(value, "")
        ids = data.get("ueSvcIds")
        if not isinstance(ids, list) or not ids:
            raise InvalidBodyError("/ueSvcIds", "must be a non-empty array of strings")
        for i, item in enumerate(ids):
            if not isinstance(item, str):
                raise InvalidBodyError(f"/ueSvcIds/{i}", "must be a string")
        return cls(
            gw_id=f.req_str(data, "gwId", ""),
            gw_type=f.req_str(data, "gwType", ""),
            target_uri=f.req_str(data, "targetUri", ""),
            ue_svc_ids=tuple(ids),
            expiry=f.opt_datetime(data, "expiry", ""),
        )

    def to_json(self) -> dict[str, Any]:
        return _compact(
            {
                "gwId": self.gw_id,
                "gwType": self.gw_type,
                "targetUri": self.target_uri,
                "ueSvcIds": list(self.ue_svc_ids),
                "expiry": format_datetime(self.expiry) if self.expiry else None,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayRegistrationAck:
    """The server's answer: the granted expiry, after which the gateway must refresh."""

    gw_id: str
    expiry: datetime

    @classmethod
    def from_json(cls, value: object) -> Self:
        data = f.obj(value, "")
        expiry = f.opt_datetime(data, "expiry", "")
        if expiry is None:
            raise InvalidBodyError("/expiry", "is required")
        return cls(gw_id=f.req_str(data, "gwId", ""), expiry=expiry)

    def to_json(self) -> dict[str, Any]:
        return {"gwId": self.gw_id, "expiry": format_datetime(self.expiry)}
