"""MSGin5G wire types (TS 29.538 V18.4.0, TS 29.571) and gatewayd's registration extension."""

from gatewayd.msgin5g.model import (
    Address,
    AddressType,
    DeliveryStatus,
    DeliveryStatusReport,
    GatewayMessageDelivery,
    MessageDeliveryAck,
    MessageSegmentParameters,
    ProblemDetails,
    ReportDeliveryStatus,
    UEMessageDelivery,
)
from gatewayd.msgin5g.registration import GatewayRegistration, GatewayRegistrationAck, GatewayType

__all__ = [
    "Address",
    "AddressType",
    "DeliveryStatus",
    "DeliveryStatusReport",
    "GatewayMessageDelivery",
    "GatewayRegistration",
    "GatewayRegistrationAck",
    "GatewayType",
    "MessageDeliveryAck",
    "MessageSegmentParameters",
    "ProblemDetails",
    "ReportDeliveryStatus",
    "UEMessageDelivery",
]
