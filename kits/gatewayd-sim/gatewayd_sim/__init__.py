"""The bundled reference MSGin5G Server (``gatewayd sim``): for demos, tests, benchmarks.

It implements the server side of MSGS_MSGDelivery (TS 29.538) and of our registration
extension MSGS_GWRegistration, and pushes downlink messages to registered gateways.
"""

from __future__ import annotations

from gatewayd_sim.records import PushResult, Registration, ReportRecord, UplinkRecord
from gatewayd_sim.server import SimServer, SimTimeoutError
from gatewayd_sim.settings import SimSettings, gateway, load

__all__ = [
    "PushResult",
    "Registration",
    "ReportRecord",
    "SimServer",
    "SimSettings",
    "SimTimeoutError",
    "UplinkRecord",
    "gateway",
    "load",
]
