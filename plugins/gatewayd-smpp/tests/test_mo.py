"""MO: deliver_sm from the real SMSC becomes an Uplink; the ack follows the store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from conftest import DEVICE, Starter
from smsc_peer import Smsc
from structlog.testing import capture_logs

from gatewayd.api import BacklogFullError, InvalidMessageError, UnknownDeviceError

ROK, RINVSRCADR, RMSGQFUL, RX_T_APPN, RX_P_APPN = 0x00, 0x0A, 0x14, 0x64, 0x65


async def send_mo(smsc: Smsc, mo_id: int, **fields: object) -> dict[str, object]:
    """Have the SMSC send one deliver_sm and return its deliver_sm_resp event."""
    await smsc.command("mo", id=mo_id, **fields)
    (resp,) = await smsc.wait_for(lambda e: e["event"] == "deliver_sm_resp" and e["id"] == mo_id)
    return resp


@pytest.mark.parametrize(
    ("text", "data_coding"),
    [("temp=21.5 {ok} €5", 0), ("Привет, мир 👋", 8)],
)
async def test_single_mo_is_accepted_with_its_text(
    smsc: Smsc, start_transport: Starter, text: str, data_coding: int
) -> None:
    _, context = await start_transport()
    resp = await send_mo(smsc, 1, source=DEVICE, text=text, data_coding=data_coding)
    assert resp["status"] == ROK
    (uplink,) = context.accepted
    assert uplink.device == DEVICE
    assert uplink.payload == text
    assert uplink.msg_id is not None
    assert uplink.msg_id.startswith("sms-")


async def test_plus_prefixed_source_and_message_payload_tlv(
    smsc: Smsc, start_transport: Starter
) -> None:
    _, context = await start_transport()
    text = "x" * 300  # longer than a short_message may be: only message_payload carries it
    resp = await send_mo(smsc, 1, source=f"+{DEVICE}", text=text, data_coding=0, payload_tlv=True)
    assert resp["status"] == ROK
    assert context.accepted[0].device == DEVICE
    assert context.accepted[0].payload == text


def udh8(ref: int, total: int, seq: int) -> str:
    return bytes([5, 0, 3, ref, total, seq]).hex()


def udh16(ref: int, total: int, seq: int) -> str:
    return bytes([6, 8, 4, ref >> 8, ref & 0xFF, total, seq]).hex()


@pytest.mark.parametrize(
    ("chunks", "data_coding", "udh"),
    [
        (["Hello ", "from a ", "long SMS [3 parts]"], 0, udh8),
        (["Ünïcødé ", "テキスト"], 8, udh16),
    ],
)
async def test_multipart_mo_is_reassembled_before_accept(
    smsc: Smsc,
    start_transport: Starter,
    chunks: list[str],
    data_coding: int,
    udh: Callable[[int, int, int], str],
) -> None:
    _, context = await start_transport()
    total = len(chunks)
    # Parts arrive out of order, none is acked before the whole message is stored.
    order = list(reversed(range(total)))
    for n, i in enumerate(order):
        await smsc.command(
            "mo",
            id=n,
            source=DEVICE,
            text=chunks[i],
            data_coding=data_coding,
            udh=udh(300 % 256 if udh is udh8 else 300, total, i + 1),
        )
        if n < total - 1:
            await asyncio.sleep(0.1)
            assert smsc.of("deliver_sm_resp") == []
    resps = await smsc.wait_for(lambda e: e["event"] == "deliver_sm_resp", count=total)
    assert {r["status"] for r in resps} == {ROK}
    (uplink,) = context.accepted
    assert uplink.payload == "".join(chunks)


async def test_sar_tlvs_are_reassembled_too(smsc: Smsc, start_transport: Starter) -> None:
    _, context = await start_transport()
    for seq, text in ((1, "split "), (2, "by SAR")):
        tlvs = {"sar_msg_ref_num": 7, "sar_total_segments": 2, "sar_segment_seqnum": seq}
        await smsc.command("mo", id=seq, source=DEVICE, text=text, data_coding=0, tlvs=tlvs)
    await smsc.wait_for(lambda e: e["event"] == "deliver_sm_resp", count=2)
    assert [u.payload for u in context.accepted] == ["split by SAR"]


async def test_ack_waits_for_accept(smsc: Smsc, start_transport: Starter) -> None:
    _, context = await start_transport()
    context.gate = asyncio.Event()
    await smsc.command("mo", id=1, source=DEVICE, text="hold on", data_coding=0)
    await asyncio.wait_for(context.entered.wait(), 5)
    await asyncio.sleep(0.3)
    assert smsc.of("deliver_sm_resp") == []  # stored? not yet: so no ack yet
    context.gate.set()
    (resp,) = await smsc.wait_for(lambda e: e["event"] == "deliver_sm_resp")
    assert resp["status"] == ROK
    assert context.accepted[0].payload == "hold on"


async def test_backlog_full_then_resend_succeeds_once(smsc: Smsc, start_transport: Starter) -> None:
    _, context = await start_transport()
    context.refuse = BacklogFullError("store full", retry_after=1.0)
    with capture_logs() as logs:
        first = await send_mo(smsc, 1, source=DEVICE, text="retry me", data_coding=0)
    assert first["status"] == RMSGQFUL
    assert context.accepted == []
    assert any(e["event"] == "smpp.mo.refused" and e["reason"] == "backlog_full" for e in logs)
    context.refuse = None
    second = await send_mo(smsc, 2, source=DEVICE, text="retry me", data_coding=0)
    assert second["status"] == ROK
    # A resend of what was stored is recognised by its msg_id: stored once.
    third = await send_mo(smsc, 3, source=DEVICE, text="retry me", data_coding=0)
    assert third["status"] == ROK
    assert [u.payload for u in context.accepted] == ["retry me"]
    assert context.calls == 3


async def test_dedup_can_be_turned_off(smsc: Smsc, start_transport: Starter) -> None:
    _, context = await start_transport(mo_dedup_window=0)
    for i in (1, 2):
        await send_mo(smsc, i, source=DEVICE, text="same", data_coding=0)
    assert [u.msg_id for u in context.accepted] == [None, None]  # the core assigns ids


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (UnknownDeviceError("not mapped"), RINVSRCADR),
        (InvalidMessageError("too big"), RX_P_APPN),
        (RuntimeError("disk on fire"), RX_T_APPN),
    ],
)
async def test_refusals_map_to_smpp_statuses(
    smsc: Smsc, start_transport: Starter, error: Exception, status: int
) -> None:
    _, context = await start_transport()
    context.refuse = error
    resp = await send_mo(smsc, 1, source="447700900999", text="who am I", data_coding=0)
    assert resp["status"] == status


async def test_binary_data_coding_is_refused_permanently(
    smsc: Smsc, start_transport: Starter
) -> None:
    _, context = await start_transport()
    resp = await send_mo(smsc, 1, source=DEVICE, hex="0102ff", data_coding=4)
    assert resp["status"] == RX_P_APPN
    assert context.calls == 0


async def test_incomplete_multipart_is_answered_after_part_timeout(
    smsc: Smsc, start_transport: Starter
) -> None:
    _, context = await start_transport(part_timeout=0.3)
    with capture_logs() as logs:
        await smsc.command(
            "mo", id=1, source=DEVICE, text="lonely", data_coding=0, udh=udh8(9, 2, 1)
        )
        (resp,) = await smsc.wait_for(lambda e: e["event"] == "deliver_sm_resp", timeout=5)
    assert resp["status"] == RX_T_APPN  # temporary: the SMSC resends the part
    assert context.calls == 0
    assert any(e["event"] == "smpp.mo.parts_expired" for e in logs)


async def test_on_arrival_acks_parts_and_keeps_them_for_a_resent_last_part(
    smsc: Smsc, start_transport: Starter
) -> None:
    _, context = await start_transport(part_ack="on_arrival")
    await smsc.command("mo", id=1, source=DEVICE, text="first ", data_coding=0, udh=udh8(5, 2, 1))
    (first,) = await smsc.wait_for(lambda e: e["event"] == "deliver_sm_resp")
    assert first["status"] == ROK  # acked on arrival, before the message is complete
    context.refuse = BacklogFullError("full")
    last = await send_mo(smsc, 2, source=DEVICE, text="second", data_coding=0, udh=udh8(5, 2, 2))
    assert last["status"] == RMSGQFUL
    context.refuse = None
    again = await send_mo(smsc, 3, source=DEVICE, text="second", data_coding=0, udh=udh8(5, 2, 2))
    assert again["status"] == ROK
    assert [u.payload for u in context.accepted] == ["first second"]
