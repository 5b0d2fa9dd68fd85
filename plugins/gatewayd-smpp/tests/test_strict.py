"""Against the strict SMSC (smpp.pdu3): the interoperability defects of issue 10, one by one."""

from __future__ import annotations

import asyncio
import struct

import pytest
import structlog
from conftest import DEVICE, OTHER, Starter
from strict_smsc import StrictSmsc

from gatewayd.api import Address, DeliveryOutcome, Device, Downlink

GSM_HELLO = b"Hello {world}"  # unpacked GSM septets; the braces are escapes
UDH = bytes.fromhex("050003")


def downlink(text: str, msg_id: str = "down-1", device: str = DEVICE) -> Downlink:
    return Downlink(
        msg_id=msg_id,
        device=Device(name=device, service_id=f"msisdn-{device}@sms.example"),
        origin=Address("AS", "as-1@m5s.example"),
        payload=text,
    )


async def test_deliver_sm_resp_carries_its_message_id_field(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Defect 1: the 16-octet deliver_sm_resp made strict SMSCs drop every session."""
    _, context = await start_strict()
    for n in range(3):
        resp = await strict.deliver(short_message=b"ping %d" % n)
        assert resp.status.name == "ESME_ROK"
    await context.wait_for(3)
    assert [e["length"] for e in strict.of("deliver_sm_resp")] == [17, 17, 17]
    assert strict.of("corrupt") == []
    assert len(strict.of("bind")) == 1  # one session all along


async def test_receipt_with_hex_id_matches_decimal_submit_id(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Defect 2: submit_sm_resp id "1000", receipt text "id:3e8": the same message."""
    transport, _ = await start_strict(receipt_timeout=5.0)
    strict.auto_receipt = "DELIVRD"
    outcome = await transport.deliver(downlink("Hi"))
    assert outcome == DeliveryOutcome.success()
    assert len(strict.of("submit_sm")) == 1


async def test_receipt_with_zero_padded_id_and_declared_formats(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    strict.id_format = "hex"
    strict.receipt_id_format = "decimal"  # "id:0000004096" for submit id "1000" (hex)
    strict.auto_receipt = "UNDELIV"
    transport, _ = await start_strict(submit_id_format="hex", receipt_id_format="decimal")
    outcome = await transport.deliver(downlink("Hi"))
    assert outcome == DeliveryOutcome.failure("UNDELIV err:000", permanent=True)


async def test_a_receipt_for_no_known_message_is_a_warning(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    await start_strict()
    with structlog.testing.capture_logs() as logs:
        await strict.receipt(424242, "DELIVRD")
        await strict.next("deliver_sm_resp")
    (event,) = [e for e in logs if e["event"] == "smpp.receipt.unmatched"]
    assert event["log_level"] == "warning"
    assert event["smsc_message_id"] == "67932"


@pytest.mark.parametrize(
    ("status", "rebinds"),
    [("ESME_RX_T_APPN", False), ("ESME_RSYSERR", False), ("ESME_RINVBNDSTS", True)],
)
async def test_temporary_submit_errors_are_transient(
    strict: StrictSmsc, start_strict: Starter, status: str, rebinds: bool
) -> None:
    """Defect 3: these dead-lettered the message as if the SMSC would never take it."""
    transport, _ = await start_strict(receipts=False)
    strict.submit_statuses = [status]
    outcome = await transport.deliver(downlink("Hi"))
    assert outcome == DeliveryOutcome.failure(status, permanent=False)
    if rebinds:
        await strict.next("bind", after=1)
        await asyncio.wait_for(transport.bound.wait(), 10)
    assert (await transport.deliver(downlink("Hi", msg_id="down-2"))).delivered
    assert len(strict.of("bind")) == (2 if rebinds else 1)


async def test_a_permanent_status_stays_permanent(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    transport, _ = await start_strict(receipts=False)
    strict.submit_statuses = ["ESME_RINVDSTADR"]
    outcome = await transport.deliver(downlink("Hi"))
    assert outcome == DeliveryOutcome.failure("ESME_RINVDSTADR", permanent=True)


@pytest.mark.parametrize(
    "source",
    ["GATEWAY", "4" * 20, "44770\u00e9900001", "", "+"],
    ids=["alphanumeric", "20 digits", "non-ASCII", "empty", "plus only"],
)
async def test_mo_from_an_invalid_source_is_refused(
    strict: StrictSmsc, start_strict: Starter, source: str
) -> None:
    """Defect 4: such sources were learned and registered; replies to them failed forever."""
    _, context = await start_strict()
    raw = source.encode("latin-1")
    resp = await strict.deliver(source=raw, short_message=b"hi")  # type: ignore[arg-type]
    assert resp.status.name == "ESME_RINVSRCADR"
    assert context.calls == 0
    # Kept for the operator (the gateway's dead-letter queue `intake`) before the answer.
    assert context.rejected == [(source, "invalid_source", None)]


async def test_mo_from_a_60_digit_source_is_refused(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """smpp.pdu3 will not encode it (21 octets at most), so the PDU is written by hand."""
    _, context = await start_strict()
    body = (
        b"\x00\x01\x01"
        + b"4" * 60
        + b"\x00\x00\x00"
        + b"4000\x00"
        + bytes([0, 0, 0])
        + b"\x00\x00"
        + bytes([0, 0, 0, 0, 2])
        + b"hi"
    )
    await strict.send_raw(struct.pack(">IIII", 16 + len(body), 5, 0, 99) + body)
    resp = await strict.next("deliver_sm_resp")
    assert (resp["status"], resp["seq"]) == ("ESME_RINVSRCADR", 99)
    assert context.calls == 0


async def test_mt_to_an_address_smpp_cannot_carry_is_permanent(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    transport, _ = await start_strict(receipts=False)
    outcome = await transport.deliver(downlink("Hi", device="4" * 25))
    assert not outcome.delivered
    assert outcome.permanent
    assert outcome.cause is not None
    assert outcome.cause.startswith("cannot encode:")
    assert strict.of("submit_sm") == []


async def test_a_generic_nack_to_a_bind_is_not_a_bind(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Defect 5: a generic_nack with status 0 was taken for a successful bind."""
    strict.answer_bind_with_nack = True
    with structlog.testing.capture_logs() as logs:
        transport, _ = await start_strict(bound=False)
        await strict.next("bind", after=1)
    assert not transport.bound.is_set()
    failed = [e for e in logs if e["event"] == "smpp.connect.failed"]
    assert failed
    assert "generic_nack" in failed[0]["error"]


async def test_a_generic_nack_to_a_submit_is_not_an_acceptance(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    transport, _ = await start_strict(receipts=False)
    strict.submit_statuses = []
    original = strict._submit

    async def nack(conn, pdu):  # type: ignore[no-untyped-def]
        from smpp.pdu import operations as op  # type: ignore[import-untyped]
        from strict_smsc import status

        await strict._send(conn, op.GenericNack(seqNum=pdu.seqNum, status=status("ESME_ROK")))

    strict._submit = nack  # type: ignore[method-assign]
    outcome = await transport.deliver(downlink("Hi"))
    strict._submit = original  # type: ignore[method-assign]
    assert not outcome.delivered
    assert "generic_nack" in (outcome.cause or "")


async def test_an_smsc_that_drops_every_bind_is_not_stormed(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Defect 6: the backoff reset on every bind, so a flapping SMSC got ~3 binds/s."""
    strict.drop_after_bind = True
    await start_strict(bound=False, reconnect_initial=0.05, reconnect_max=0.4)
    await asyncio.sleep(2.0)
    binds = strict.of("bind")
    # 0.05, 0.1, 0.2, 0.4, 0.4 ... (x0.5..1 jitter): at most ~12 in 2 s; the old loop
    # made one every 25-50 ms (40+).
    assert 3 <= len(binds) <= 14, len(binds)


async def test_a_part_sent_twice_is_answered_twice(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Defect 7: the replaced copy of a resent part never got a deliver_sm_resp."""
    _, context = await start_strict()
    part1 = UDH + bytes([7, 2, 1]) + b"Hello "
    part2 = UDH + bytes([7, 2, 2]) + b"world"
    await strict.deliver(short_message=part1, udhi=True, wait=False)
    await strict.deliver(short_message=part1, udhi=True, wait=False)  # the SMSC's resend
    await strict.deliver(short_message=part2, udhi=True, wait=False)
    answered = await strict.wait_for(lambda e: e["event"] == "deliver_sm_resp", count=3)
    assert {e["status"] for e in answered} == {"ESME_ROK"}
    assert [u.payload for u in context.accepted] == ["Hello world"]


@pytest.mark.parametrize(
    ("data_coding", "octets", "text"),
    [
        (0x48, "Ωmega".encode("utf-16-be"), "Ωmega"),  # 01xx: automatic deletion, UCS-2
        (0x40, b"plain", "plain"),  # 01xx, GSM
        (0xE8, "Ωmega".encode("utf-16-be"), "Ωmega"),  # 1110: MWI store, UCS-2
        (0xD0, b"voicemail", "voicemail"),  # 1101: MWI store, GSM
        (0x06, "Привет".encode("iso8859-5"), "Привет"),  # SMPP 0x06: Cyrillic
        (0x11, b"class 1", "class 1"),
    ],
)
async def test_data_codings_of_ts_23_038(
    strict: StrictSmsc, start_strict: Starter, data_coding: int, octets: bytes, text: str
) -> None:
    """Defect 8: groups 01xx and 1110 and SMPP's 0x06 were refused."""
    _, context = await start_strict()
    resp = await strict.deliver(short_message=octets, data_coding=data_coding)
    assert resp.status.name == "ESME_ROK"
    assert [u.payload for u in context.accepted] == [text]


@pytest.mark.parametrize("data_coding", [0x30, 0x24, 0x04, 0xF4, 0x80, 0x0C])
async def test_codings_that_are_not_text_are_refused(
    strict: StrictSmsc, start_strict: Starter, data_coding: int
) -> None:
    """0x30 is compressed GSM (it was decoded as plain GSM); the rest are data/reserved."""
    _, context = await start_strict()
    resp = await strict.deliver(short_message=b"\x01\x02", data_coding=data_coding)
    assert resp.status.name == "ESME_RX_P_APPN"
    assert context.calls == 0


async def test_parts_with_different_codings_are_each_decoded_with_their_own(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    _, context = await start_strict()
    part1 = UDH + bytes([9, 2, 1]) + b"Price: "
    part2 = UDH + bytes([9, 2, 2]) + "10 €".encode("utf-16-be")
    await strict.deliver(short_message=part1, udhi=True, data_coding=0, wait=False)
    await strict.deliver(short_message=part2, udhi=True, data_coding=8, wait=False)
    await strict.wait_for(lambda e: e["event"] == "deliver_sm_resp", count=2)
    assert [u.payload for u in context.accepted] == ["Price: 10 €"]


async def test_mo_variety_gsm_extension_ucs2_emoji_udh16_sar(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    _, context = await start_strict()
    await strict.deliver(
        short_message=GSM_HELLO.replace(b"{", b"\x1b\x28").replace(b"}", b"\x1b\x29")
    )
    await strict.deliver(short_message="ok 👍".encode("utf-16-be"), data_coding=8)
    udh16 = bytes.fromhex("060804") + bytes([0x12, 0x34, 2])
    await strict.deliver(short_message=udh16 + b"\x01" + b"sixteen ", udhi=True, wait=False)
    await strict.deliver(short_message=udh16 + b"\x02" + b"bit", udhi=True, wait=False)
    await strict.deliver(
        short_message=b"S",
        sar_msg_ref_num=77,
        sar_total_segments=2,
        sar_segment_seqnum=1,
        wait=False,
    )
    await strict.deliver(
        short_message=b"AR",
        sar_msg_ref_num=77,
        sar_total_segments=2,
        sar_segment_seqnum=2,
        wait=False,
    )
    await context.wait_for(4)
    assert [u.payload for u in context.accepted] == [
        "Hello {world}",
        "ok 👍",
        "sixteen bit",
        "SAR",
    ]


async def test_mo_through_data_sm(strict: StrictSmsc, start_strict: Starter) -> None:
    _, context = await start_strict()
    resp = await strict.data_sm(
        source=OTHER, payload="data_sm ✓".encode("utf-16-be"), data_coding=8
    )
    assert resp.commandId.name == "data_sm_resp"
    assert resp.status.name == "ESME_ROK"
    assert context.accepted[0].payload == "data_sm ✓"
    assert context.accepted[0].device == OTHER


async def test_mt_of_two_parts_with_receipts_in_the_other_base(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    strict.auto_receipt = "DELIVRD"
    strict.receipt_tlvs = True  # receipted_message_id in hex too
    transport, _ = await start_strict(receipt_timeout=5.0)
    text = "Ж" + "x" * 100  # UCS-2 (Ж is not GSM): 101 characters, two parts
    assert (await transport.deliver(downlink(text))).delivered
    parts = strict.of("submit_sm")
    assert len(parts) == 2
    bodies = [bytes.fromhex(p["short_message"]) for p in parts]
    assert [b[:5] for b in bodies] == [bytes([5, 0, 3, b[3], 2]) for b in bodies]
    assert [b[5] for b in bodies] == [1, 2]
    assert b"".join(b[6:] for b in bodies).decode("utf-16-be") == text
    assert all(p["esm_class"] == 0x40 and p["data_coding"] == 8 for p in parts)


async def test_throttling_pauses_and_retries(strict: StrictSmsc, start_strict: Starter) -> None:
    transport, _ = await start_strict(receipts=False, throttle_backoff=0.2)
    strict.submit_statuses = ["ESME_RTHROTTLED", "ESME_RMSGQFUL"]
    assert (await transport.deliver(downlink("slowly"))).delivered
    stamps = [e["at"] for e in strict.of("submit_sm")]
    assert len(stamps) == 3
    assert stamps[1] - stamps[0] >= 0.18  # throttle_backoff
    assert stamps[2] - stamps[1] >= 0.38  # doubled


async def test_malformed_pdus_from_the_smsc(strict: StrictSmsc, start_strict: Starter) -> None:
    transport, context = await start_strict()
    # A deliver_sm whose body ends inside the addresses: refused, the session stays.
    await strict.send_raw(struct.pack(">IIII", 20, 5, 0, 41) + b"\x00\x01\x014")
    resp = await strict.next("deliver_sm_resp")
    assert (resp["status"], resp["seq"], resp["length"]) == ("ESME_RINVMSGLEN", 41, 17)
    # An unknown command: generic_nack ESME_RINVCMDID, the session stays.
    await strict.send_raw(struct.pack(">IIII", 16, 0x00000777, 0, 42))
    nack = await strict.next("generic_nack")
    assert (nack["status"], nack["seq"]) == ("ESME_RINVCMDID", 42)
    assert (await strict.deliver(short_message=b"still here")).status.name == "ESME_ROK"
    assert len(strict.of("bind")) == 1
    # An impossible command_length: the stream cannot be trusted; the transport rebinds.
    await strict.send_raw(struct.pack(">IIII", 8, 5, 0, 43))
    await strict.next("bind", after=1)
    await asyncio.wait_for(transport.bound.wait(), 10)
    assert [u.payload for u in context.accepted] == ["still here"]


async def test_ids_that_collide_across_bases_each_get_their_own_receipt(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Decimal submit ids, hex receipts ("auto" on both sides). A first receipt ("3e7"
    for 999) teaches the transport the pair; then submits 1000 and 4096 wait at once, and
    4096's receipt reads "1000": it used to settle the other message."""
    strict.submit_ids = [999, 1000, 4096]
    strict.auto_receipt = "DELIVRD"
    transport, _ = await start_strict(receipt_timeout=5.0)
    with structlog.testing.capture_logs() as logs:
        assert (await transport.deliver(downlink("first", msg_id="mt-0"))).delivered
        strict.auto_receipt = None
        a = asyncio.create_task(transport.deliver(downlink("to 1000", msg_id="mt-a")))
        b = asyncio.create_task(transport.deliver(downlink("to 4096", msg_id="mt-b")))
        await strict.wait_for(lambda e: e["event"] == "submit_sm", count=3)
        await strict.receipt(4096, "DELIVRD")  # "id:1000"
        assert (await asyncio.wait_for(b, 5)).delivered
        assert not a.done()
        await strict.receipt(1000, "UNDELIV")  # "id:3e8"
        assert await asyncio.wait_for(a, 5) == DeliveryOutcome.failure(
            "UNDELIV err:000", permanent=True
        )
    learned = [e for e in logs if e["event"] == "smpp.receipt.format_learned"]
    assert [(e["submit_id_format"], e["receipt_id_format"]) for e in learned] == [
        ("decimal", "hex")
    ]
    assert [e for e in logs if e["event"] == "smpp.receipt.ambiguous"] == []
    assert [e["message_id"] for e in strict.of("submit_sm")] == ["999", "1000", "4096"]
