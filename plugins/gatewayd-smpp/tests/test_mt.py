"""MT: Downlink -> submit_sm to the real SMSC; outcomes from responses and receipts."""

from __future__ import annotations

import asyncio

import pytest
from conftest import DEVICE, Starter
from gatewayd_smpp.transport import SmppTransport
from smsc_peer import Smsc

from gatewayd.api import Address, DeliveryOutcome, Device, Downlink, UplinkReport

DELIVRD = {"state": 2, "stat": "DELIVRD"}


def downlink(text: str | None, msg_id: str = "down-1") -> Downlink:
    return Downlink(
        msg_id=msg_id,
        device=Device(name=DEVICE, service_id=f"msisdn-{DEVICE}@sms.example"),
        origin=Address("AS", "as-1@m5s.example"),
        payload=text,
    )


async def test_short_gsm_text_with_receipt(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport()
    await smsc.command("auto_receipt", receipt=DELIVRD)
    outcome = await transport.deliver(downlink("Hi [you] ~ 10€ @home"))
    assert outcome == DeliveryOutcome.success()
    (submit,) = smsc.of("submit_sm")
    assert submit["destination_addr"] == DEVICE
    assert submit["source_addr"] == "4000"
    assert submit["dest_addr_ton"] == 1
    assert submit["data_coding"] == 0  # set explicitly, never left to the SMSC
    assert submit["esm_class"] == 0
    assert submit["registered_delivery"] == 1
    assert submit["message"] == "Hi [you] ~ 10€ @home"
    assert submit["udh"] == []


async def test_long_ucs2_is_segmented_with_concatenation_udh(
    smsc: Smsc, start_transport: Starter
) -> None:
    transport, _ = await start_transport()
    await smsc.command("auto_receipt", receipt=DELIVRD)
    text = "Съешь же ещё этих мягких французских булок, да выпей чаю. " * 3  # 174 chars
    outcome = await transport.deliver(downlink(text))
    assert outcome.delivered
    parts = smsc.of("submit_sm")
    assert len(parts) == 3
    assert [len(p["message"]) for p in parts] == [67, 67, 40]
    assert "".join(p["message"] for p in parts) == text
    refs = set()
    for seq, part in enumerate(parts, start=1):
        assert part["data_coding"] == 8
        assert part["esm_class"] & 0x40  # UDHI
        (ie,) = part["udh"]
        raw = bytes.fromhex(ie)
        assert raw[:2] == b"\x00\x03"  # concatenation, 8-bit reference
        assert (raw[3], raw[4]) == (3, seq)
        refs.add(raw[2])
    assert len(refs) == 1


async def test_long_gsm_uses_153_septets_per_part(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport(receipts=False)
    text = "0123456789" * 29 + "{end}"  # 297 septets with the braces' escapes
    assert (await transport.deliver(downlink(text))).delivered
    parts = smsc.of("submit_sm")
    assert [p["data_coding"] for p in parts] == [0, 0]
    assert "".join(p["message"] for p in parts) == text
    assert len(parts[0]["message"]) == 153
    assert all(p["registered_delivery"] == 0 for p in parts)


async def test_an_escape_sequence_is_never_split(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport(receipts=False)
    text = "a" * 152 + "€" + "b" * 10  # the euro's ESC would be septet 153, its code 154
    assert (await transport.deliver(downlink(text))).delivered
    first, second = smsc.of("submit_sm")
    assert first["message"] == "a" * 152
    assert second["message"] == "€" + "b" * 10


async def test_without_receipts_submit_sm_resp_is_success(
    smsc: Smsc, start_transport: Starter
) -> None:
    transport, _ = await start_transport(receipts=False)
    assert await transport.deliver(downlink("no receipt please")) == DeliveryOutcome.success()
    assert smsc.of("submit_sm")[0]["registered_delivery"] == 0


@pytest.mark.parametrize("stat", [(5, "UNDELIV"), (3, "EXPIRED"), (8, "REJECTD")])
async def test_failed_receipt_is_a_permanent_failure(
    smsc: Smsc, start_transport: Starter, stat: tuple[int, str]
) -> None:
    transport, _ = await start_transport()
    await smsc.command("auto_receipt", receipt={"state": stat[0], "stat": stat[1]})
    outcome = await transport.deliver(downlink("doomed"))
    assert not outcome.delivered
    assert outcome.permanent
    assert outcome.cause is not None
    assert outcome.cause.startswith(stat[1])


async def test_receipt_in_text_form_only(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport()
    task = asyncio.create_task(transport.deliver(downlink("text receipt")), name="deliver")
    submit = await smsc.next("submit_sm")
    await smsc.command(
        "receipt",
        message_id=submit["message_id"],
        source=DEVICE,
        stat="DELIVRD",
        state=2,
        textOnly=True,
    )
    assert (await task).delivered


async def test_one_failed_part_fails_the_message(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport()
    task = asyncio.create_task(transport.deliver(downlink("ж" * 100)), name="deliver")
    first, second = await smsc.wait_for(lambda e: e["event"] == "submit_sm", count=2)
    await smsc.command("receipt", message_id=first["message_id"], source=DEVICE, **DELIVRD)
    await smsc.command(
        "receipt",
        message_id=second["message_id"],
        source=DEVICE,
        state=5,
        stat="UNDELIV",
        err="0x0B",
    )
    outcome = await task
    assert not outcome.delivered
    assert outcome.cause == "UNDELIV err:0x0B"


async def test_missing_receipt_is_a_transient_failure(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport(receipt_timeout=0.3)
    outcome = await transport.deliver(downlink("into the void"))
    assert not outcome.delivered
    assert not outcome.permanent
    assert "no delivery receipt" in (outcome.cause or "")


async def test_throttling_pauses_then_succeeds(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport(receipts=False, throttle_backoff=0.2)
    await smsc.command("submit_statuses", statuses=[0x58])
    started = asyncio.get_running_loop().time()
    assert (await transport.deliver(downlink("slowly"))).delivered
    assert asyncio.get_running_loop().time() - started >= 0.2
    assert [s["status"] for s in smsc.of("submit_sm")] == [0x58, 0]


@pytest.mark.parametrize("status", [0x58, 0x14])
async def test_persistent_throttling_is_a_transient_failure(
    smsc: Smsc, start_transport: Starter, status: int
) -> None:
    transport, _ = await start_transport(receipts=False, throttle_backoff=0.05, throttle_retries=1)
    await smsc.command("submit_statuses", statuses=[status] * 2)
    outcome = await transport.deliver(downlink("too fast"))
    assert not outcome.delivered
    assert not outcome.permanent
    assert outcome.cause in ("ESME_RTHROTTLED", "ESME_RMSGQFUL")


async def test_other_submit_errors_are_permanent(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport(receipts=False)
    await smsc.command("submit_statuses", statuses=[0x0B])
    outcome = await transport.deliver(downlink("bad number"))
    assert outcome == DeliveryOutcome.failure("ESME_RINVDSTADR", permanent=True)


async def test_window_limits_outstanding_submits(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport(receipts=False, window=2, response_timeout=1.0)
    await smsc.command("hold_submits", hold=True)
    tasks = [
        asyncio.create_task(transport.deliver(downlink(f"m{i}", f"d{i}")), name=f"deliver-{i}")
        for i in range(4)
    ]
    await smsc.wait_for(lambda e: e["event"] == "submit_sm", count=2)
    await asyncio.sleep(0.4)
    assert len(smsc.of("submit_sm")) == 2  # the other two wait for a free slot
    await smsc.command("hold_submits", hold=False)
    outcomes = await asyncio.gather(*tasks)
    assert [o.delivered for o in outcomes] == [False, False, True, True]
    assert all(not o.permanent for o in outcomes)


async def test_not_bound_is_a_transient_failure(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport()
    await smsc.stop()
    await asyncio.sleep(0.2)
    outcome = await transport.deliver(downlink("anyone?"))
    assert outcome == DeliveryOutcome.failure("SMSC not bound")


async def test_reports_are_not_carried(start_transport: Starter) -> None:
    transport: SmppTransport
    transport, _ = await start_transport()
    report = UplinkReport(device=downlink("x").device, msg_id="up-1", delivered=True)
    assert await transport.deliver_report(report) is False
