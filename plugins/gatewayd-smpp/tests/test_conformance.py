"""The smpp transport against the transport conformance suite (gatewayd_testing).

The device side is the SMSC (npm ``smpp``) delivering MO messages from one MSISDN. SMS
carries no server reports to the device; a full store is ``ESME_RMSGQFUL`` (the SMSC
keeps the message and retries), bad input (8-bit data) is ``ESME_RX_P_APPN``.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import pytest
from gatewayd_testing.conformance import (
    SERVICE_ID,
    ConformanceEnv,
    DeviceSide,
    TransportConformance,
    UplinkAnswer,
)
from smsc_peer import Smsc

MSISDN = "447700900077"
ESME_RMSGQFUL = 0x14
ESME_RX_P_APPN = 0x65


class SmscDevice(DeviceSide):
    carries_reports: ClassVar[bool] = False

    def __init__(self, env: ConformanceEnv, smsc: Smsc) -> None:
        self.smsc = smsc
        self.ids = itertools.count(1)
        self.submits = 0
        self.config = f"""
            [transports.{env.transport}]
            plugin = "smpp"
            host = "127.0.0.1"
            port = {smsc.port}
            system_id = "gatewayd"
            password = {{ env = "SMPP_TEST_PASSWORD" }}
            source_addr = "4000"
            reconnect_initial = 0.05
            reconnect_max = 0.5
            receipt_timeout = 10.0
            [[transports.{env.transport}.devices]]
            device = "{MSISDN}"
            service_id = "{SERVICE_ID}"
            """

    async def _mo(self, **fields: Any) -> int:
        await self.smsc.wait_for(lambda e: e["event"] == "bind", timeout=20)
        n = next(self.ids)
        await self.smsc.command("mo", id=n, source=MSISDN, **fields)
        (resp,) = await self.smsc.wait_for(
            lambda e: e["event"] == "deliver_sm_resp" and e["id"] == n, timeout=20
        )
        status: int = resp["status"]
        return status

    async def send_uplink(
        self, gateway: Any, payload: str, *, msg_id: str, report: bool = False
    ) -> UplinkAnswer:
        # SMS has no message id of its own: the same text within the dedup window is a
        # resend, which is what the suite's redelivery sends.
        status = await self._mo(text=payload, data_coding=0)
        detail = f"command_status 0x{status:02X}"
        return UplinkAnswer(
            accepted=status == 0, retry_later=status == ESME_RMSGQFUL, detail=detail
        )

    async def next_downlink(self, timeout: float) -> str | None:
        submit = await self.smsc.next("submit_sm", after=self.submits, timeout=timeout)
        self.submits += 1
        text: str = submit["message"]
        return text

    async def send_malformed(self, gateway: Any) -> str:
        status = await self._mo(hex="00ff10", data_coding=4)  # 8-bit data, not text
        assert status == ESME_RX_P_APPN, f"0x{status:02X}"
        return "ESME_RX_P_APPN"

    async def endpoint_closed(self, gateway: Any) -> bool:
        await self.smsc.wait_for(lambda e: e["event"] in ("unbind", "close"), timeout=10)
        return True


class TestSmppConformance(TransportConformance):
    gateway_type: ClassVar[str] = "L3G"

    @pytest.fixture
    async def device_side(self, conformance_env: ConformanceEnv, smsc: Smsc) -> DeviceSide:
        await smsc.command("auto_receipt", receipt={"state": 2, "stat": "DELIVRD"})
        return SmscDevice(conformance_env, smsc)
