"""API names and resource paths of TS 29.538 and of our registration extension."""

from __future__ import annotations

from gatewayd.msgin5g.registration import API_NAME as GWREG_API
from gatewayd.msgin5g.registration import API_VERSION, GatewayType

MSGS_DELIVERY = "/msgs-msgdelivery/v1"
MSGS_GWREGISTRATION = f"/{GWREG_API}/{API_VERSION}"
DELIVER_UE_MESSAGE = f"{MSGS_DELIVERY}/deliver-ue-message"
DELIVER_REPORT = f"{MSGS_DELIVERY}/deliver-report"
REGISTRATIONS = f"{MSGS_GWREGISTRATION}/registrations"


def gateway_api_prefix(gateway_type: str) -> str:
    """``MSGG_L3GDelivery`` or ``MSGG_N3GDelivery``, by role."""
    return "/msgg-l3gdelivery/v1" if gateway_type == GatewayType.L3G else "/msgg-n3gdelivery/v1"
