"""TS 29.538 V18.4.0 data types that cross MSGin5G-2 and MSGin5G-4.

Enumerations are open (``anyOf`` with a free string in the spec): fields hold plain
strings, the known values are constants on a :class:`~enum.StrEnum`, and unknown values
pass through untouched rather than being rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self

from gatewayd.msgin5g import fields as f


class AddressType(StrEnum):
    UE = "UE"
    AS = "AS"
    GROUP = "GROUP"
    BC = "BC"
    TOPIC = "TOPIC"


class DeliveryStatus(StrEnum):
    DELY_FAILED = "DELY_FAILED"
    DELY_STORED = "DELY_STORED"


class ReportDeliveryStatus(StrEnum):
    REPT_DELY_SUCCESS = "REPT_DELY_SUCCESS"
    REPT_DELY_FAILED = "REPT_DELY_FAILED"


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def format_datetime(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Address:
    """``Address``: who sends or receives; ``addr_type`` is an open enumeration."""

    addr_type: str
    addr: str

    @classmethod
    def ue(cls, service_id: str) -> Self:
        return cls(AddressType.UE.value, service_id)

    @classmethod
    def from_json(cls, value: object, pointer: str = "") -> Self:
        data = f.obj(value, pointer)
        return cls(f.req_str(data, "addrType", pointer), f.req_str(data, "addr", pointer))

    def to_json(self) -> dict[str, Any]:
        return {"addrType": self.addr_type, "addr": self.addr}

    def __str__(self) -> str:
        return f"{self.addr_type}:{self.addr}"


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageSegmentParameters:
    """``segParams``: which set a segment belongs to and where it sits in it.

    TS 29.538 gives no descriptions; TS 23.554 8.5.4 names the information elements:
    segmentation set identifier (``segId``), total number of segments (first segment
    only), segment number, last segment flag (last segment only). How gatewayd uses
    them: :mod:`gatewayd.segments` and docs/segmentation.md.
    """

    seg_id: str | None = None
    total_seg_count: int | None = None
    seg_numb: int | None = None
    last_seg_flag: bool | None = None

    @classmethod
    def from_json(cls, value: object, pointer: str) -> Self:
        data = f.obj(value, pointer)
        return cls(
            seg_id=f.opt_str(data, "segId", pointer),
            total_seg_count=f.opt_int(data, "totalSegCount", pointer),
            seg_numb=f.opt_int(data, "segNumb", pointer),
            last_seg_flag=f.opt_bool(data, "lastSegFlag", pointer),
        )

    def to_json(self) -> dict[str, Any]:
        return _compact(
            {
                "segId": self.seg_id,
                "totalSegCount": self.total_seg_count,
                "segNumb": self.seg_numb,
                "lastSegFlag": self.last_seg_flag,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UEMessageDelivery:
    """Uplink: a device behind the gateway sends a message (``POST /deliver-ue-message``)."""

    ori_addr: Address
    dest_addr: Address
    msg_id: str
    sto_and_fw_ind: bool
    app_id: str | None = None
    deliv_st_req_ind: bool | None = None
    payload: str | None = None
    seg_ind: bool | None = None
    seg_params: MessageSegmentParameters | None = None
    expiry: datetime | None = None  # stoAndFwParams.exprTime

    @classmethod
    def from_json(cls, value: object) -> Self:
        data = f.obj(value, "")
        sto = data.get("stoAndFwParams")
        return cls(
            ori_addr=Address.from_json(data.get("oriAddr"), "/oriAddr"),
            dest_addr=Address.from_json(data.get("destAddr"), "/destAddr"),
            msg_id=f.req_str(data, "msgId", ""),
            sto_and_fw_ind=f.req_bool(data, "stoAndFwInd", ""),
            app_id=f.opt_str(data, "appId", ""),
            deliv_st_req_ind=f.opt_bool(data, "delivStReqInd", ""),
            payload=f.opt_str(data, "payload", ""),
            seg_ind=f.opt_bool(data, "segInd", ""),
            seg_params=_seg_params(data),
            expiry=None
            if "stoAndFwParams" not in data  # present but null is malformed, not absent
            else f.opt_datetime(f.obj(sto, "/stoAndFwParams"), "exprTime", "/stoAndFwParams"),
        )

    def to_json(self) -> dict[str, Any]:
        return _compact(
            {
                "oriAddr": self.ori_addr.to_json(),
                "destAddr": self.dest_addr.to_json(),
                "appId": self.app_id,
                "msgId": self.msg_id,
                "delivStReqInd": self.deliv_st_req_ind,
                "payload": self.payload,
                "segInd": self.seg_ind,
                "segParams": self.seg_params.to_json() if self.seg_params else None,
                "stoAndFwInd": self.sto_and_fw_ind,
                "stoAndFwParams": {"exprTime": format_datetime(self.expiry)}
                if self.expiry
                else None,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayMessageDelivery:
    """Downlink toward a device: ``N3gMessageDelivery`` and ``L3gMessageDelivery``.

    The two schemas are identical in V18.4.0, so one type serves both APIs.
    """

    ori_addr: Address
    dest_addr: Address
    msg_id: str
    app_id: str | None = None
    deliv_st_req_ind: bool | None = None
    payload: str | None = None
    seg_ind: bool | None = None
    seg_params: MessageSegmentParameters | None = None

    @classmethod
    def from_json(cls, value: object) -> Self:
        data = f.obj(value, "")
        return cls(
            ori_addr=Address.from_json(data.get("oriAddr"), "/oriAddr"),
            dest_addr=Address.from_json(data.get("destAddr"), "/destAddr"),
            msg_id=f.req_str(data, "msgId", ""),
            app_id=f.opt_str(data, "appId", ""),
            deliv_st_req_ind=f.opt_bool(data, "delivStReqInd", ""),
            payload=f.opt_str(data, "payload", ""),
            seg_ind=f.opt_bool(data, "segInd", ""),
            seg_params=_seg_params(data),
        )

    def to_json(self) -> dict[str, Any]:
        return _compact(
            {
                "oriAddr": self.ori_addr.to_json(),
                "destAddr": self.dest_addr.to_json(),
                "appId": self.app_id,
                "msgId": self.msg_id,
                "delivStReqInd": self.deliv_st_req_ind,
                "payload": self.payload,
                "segInd": self.seg_ind,
                "segParams": self.seg_params.to_json() if self.seg_params else None,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDeliveryAck:
    """The server's answer to an uplink message or report (``200``)."""

    ori_addr: Address
    msg_id: str
    status: str | None = None
    failure_cause: str | None = None

    @classmethod
    def from_json(cls, value: object) -> Self:
        data = f.obj(value, "")
        return cls(
            ori_addr=Address.from_json(data.get("oriAddr"), "/oriAddr"),
            msg_id=f.req_str(data, "msgId", ""),
            status=f.opt_str(data, "status", ""),
            failure_cause=f.opt_str(data, "failureCause", ""),
        )

    def to_json(self) -> dict[str, Any]:
        return _compact(
            {
                "oriAddr": self.ori_addr.to_json(),
                "msgId": self.msg_id,
                "status": self.status,
                "failureCause": self.failure_cause,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryStatusReport:
    """Whether a message reached its destination; ``ori_addr`` is the reporting party."""

    ori_addr: Address
    dest_addr: Address
    msg_id: str
    deliv_st: str
    failure_cause: str | None = None

    @property
    def delivered(self) -> bool:
        return self.deliv_st == ReportDeliveryStatus.REPT_DELY_SUCCESS

    @classmethod
    def from_json(cls, value: object) -> Self:
        data = f.obj(value, "")
        return cls(
            ori_addr=Address.from_json(data.get("oriAddr"), "/oriAddr"),
            dest_addr=Address.from_json(data.get("destAddr"), "/destAddr"),
            msg_id=f.req_str(data, "msgId", ""),
            deliv_st=f.req_str(data, "delivSt", ""),
            failure_cause=f.opt_str(data, "failureCause", ""),
        )

    def to_json(self) -> dict[str, Any]:
        return _compact(
            {
                "oriAddr": self.ori_addr.to_json(),
                "destAddr": self.dest_addr.to_json(),
                "msgId": self.msg_id,
                "failureCause": self.failure_cause,
                "delivSt": self.deliv_st,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class InvalidParam:
    param: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _compact({"param": self.param, "reason": self.reason})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProblemDetails:
    """TS 29.571 ``ProblemDetails`` (RFC 7807 with 3GPP's ``cause``)."""

    status: int
    title: str
    detail: str | None = None
    cause: str | None = None
    invalid_params: tuple[InvalidParam, ...] = ()

    @classmethod
    def from_json(cls, value: object) -> Self:
        data = f.obj(value, "")
        params = data.get("invalidParams") or []
        return cls(
            status=f.opt_int(data, "status", "") or 0,
            title=f.opt_str(data, "title", "") or "",
            detail=f.opt_str(data, "detail", ""),
            cause=f.opt_str(data, "cause", ""),
            invalid_params=tuple(
                InvalidParam(param=str(p.get("param", "")), reason=p.get("reason"))
                for p in params
                if isinstance(p, dict)
            ),
        )

    def to_json(self) -> dict[str, Any]:
        return _compact(
            {
                "title": self.title,
                "status": self.status,
                "detail": self.detail,
                "cause": self.cause,
                "invalidParams": [p.to_json() for p in self.invalid_params] or None,
            }
        )


def _seg_params(data: Any) -> MessageSegmentParameters | None:
    # Present but null is malformed (nothing is nullable in TS 29.538), not absent.
    if "segParams" not in data:
        return None
    return MessageSegmentParameters.from_json(data["segParams"], "/segParams")
