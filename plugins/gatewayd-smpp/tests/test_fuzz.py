"""Fuzzing the PDU decoder, MO intake and reassembly with mutated real PDUs.

A seeded mutation fuzzer (no extra dependency): valid deliver_sm / data_sm bodies of
every shape the transport reads (GSM, UCS-2, 8- and 16-bit concatenation UDH, SAR,
receipts with and without TLVs) are bit-flipped, truncated, extended and spliced, and
fed through the same path an SMSC's PDUs take: header check, body decoder, receipt
parser, UDH reader, text decoder and the reassembler. The oracle: nothing but
:class:`PduError` escapes the decoders, intake never raises, and **every request is
answered exactly once** (parts included, once their message completes or expires).

CI runs a short mode (10 000 inputs, a few seconds); ``--long`` runs 10^6.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections import Counter

import pytest
from conftest import DEVICE, SmsContext, base_options, make_settings
from gatewayd_smpp import receipts
from gatewayd_smpp.config import SmppConfig
from gatewayd_smpp.intake import Intake
from gatewayd_smpp.pdu import (
    ESM_UDHI,
    HEADER,
    Command,
    Pdu,
    PduError,
    ShortMessage,
    Tag,
    parse_header,
)

SHORT = 10_000
LONG = 1_000_000


def seeds() -> list[tuple[int, bytes]]:
    """(command_id, body) of well-formed MO, multi-part and receipt PDUs."""

    def sm(**fields: object) -> bytes:
        base: dict[str, object] = {
            "source_addr": DEVICE,
            "source_addr_ton": 1,
            "destination_addr": "4000",
        }
        base.update(fields)
        return ShortMessage(**base).encode()  # type: ignore[arg-type]

    udh8 = bytes([5, 0, 3, 42, 2])
    udh16 = bytes([6, 8, 4, 1, 2, 2])
    receipt_text = b"id:3e8 sub:001 dlvrd:001 submit date:2612041200 stat:DELIVRD err:000"
    data_sm = b"\x00\x01\x01" + DEVICE.encode() + b"\x00\x00\x00" + b"4000\x00" + bytes([0, 0, 8])
    return [
        (Command.DELIVER_SM, sm(short_message=b"Hello \x1b\x28world\x1b\x29")),
        (Command.DELIVER_SM, sm(data_coding=8, short_message="ok 👍".encode("utf-16-be"))),
        (Command.DELIVER_SM, sm(esm_class=ESM_UDHI, short_message=udh8 + b"\x01" + b"part one ")),
        (Command.DELIVER_SM, sm(esm_class=ESM_UDHI, short_message=udh8 + b"\x02" + b"two")),
        (Command.DELIVER_SM, sm(esm_class=ESM_UDHI, short_message=udh16 + b"wide")),
        (
            Command.DELIVER_SM,
            sm(
                short_message=b"SAR",
                tlvs={
                    Tag.SAR_MSG_REF_NUM: b"\x00\x07",
                    Tag.SAR_TOTAL_SEGMENTS: b"\x02",
                    Tag.SAR_SEGMENT_SEQNUM: b"\x01",
                },
            ),
        ),
        (Command.DELIVER_SM, sm(esm_class=0x04, short_message=receipt_text)),
        (
            Command.DELIVER_SM,
            sm(
                esm_class=0x04,
                tlvs={Tag.RECEIPTED_MESSAGE_ID: b"1000\x00", Tag.MESSAGE_STATE: b"\x05"},
            ),
        ),
        (Command.DELIVER_SM, sm(data_coding=0x48, short_message="Ω".encode("utf-16-be"))),
        (Command.DATA_SM, data_sm + struct.pack(">HH", Tag.MESSAGE_PAYLOAD, 4) + b"\x00h\x00i"),
    ]


INTERESTING = (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x1B, 0x40, 0x7F, 0x80, 0xFF)


def mutate(rng: random.Random, body: bytes, pool: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        if choice == 0 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and data:
            data[rng.randrange(len(data))] = rng.choice(INTERESTING)
        elif choice == 2:
            del data[rng.randrange(len(data) + 1) :]
        elif choice == 3:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice == 4:
            other = rng.choice(pool)[1]
            cut = rng.randrange(len(other) + 1)
            data = data[: rng.randrange(len(data) + 1)] + bytearray(other[cut:])
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 40)))
    return bytes(data)


class AnsweringSession:
    """Stands where a Session stands for intake: it records each response."""

    def __init__(self) -> None:
        self.answers: Counter[int] = Counter()

    async def respond(self, request: Pdu, status: int, body: bytes | None = None) -> bool:
        self.answers[request.sequence] += 1
        return True


def check_decoders(command: int, body: bytes) -> None:
    """Only PduError may come out of the decoders."""
    header = HEADER.pack(HEADER.size + len(body), command, 0, 1)
    with_garbage = (body[:16] + header)[:16]
    for head in (header, with_garbage):
        with contextlib.suppress(PduError):
            parse_header(head)
    try:
        if command == Command.DATA_SM:
            sm = ShortMessage.decode_data_sm(body)
        else:
            sm = ShortMessage.decode(body)
    except PduError:
        return
    receipts.parse(sm)


async def run(count: int, seed: int) -> None:
    settings = make_settings(base_options(1, part_timeout=0.05, mo_dedup_window=0.0))
    config = SmppConfig.from_settings(settings)
    context = SmsContext(settings.devices)
    book = receipts.ReceiptBook()

    async def unclaimed(receipt: receipts.Receipt) -> None:
        del receipt

    intake = Intake(config, context, book, context.log, unclaimed)
    session = AnsweringSession()
    rng = random.Random(seed)
    pool = seeds()
    for sequence in range(1, count + 1):
        command, body = rng.choice(pool)
        if rng.random() < 0.9:
            body = mutate(rng, body, pool)
        check_decoders(command, body)
        await intake.on_deliver(session, Pdu(command, 0, sequence, body))  # type: ignore[arg-type]
        if sequence % 5000 == 0:
            await asyncio.sleep(0.06)
            await intake.expire_parts()
    await asyncio.sleep(0.06)
    await intake.expire_parts()
    missing = [s for s in range(1, count + 1) if session.answers[s] != 1]
    assert missing == [], f"{len(missing)} requests not answered exactly once: {missing[:10]}"


async def test_fuzz_decoder_intake_and_reassembly_short() -> None:
    await run(SHORT, seed=10)


@pytest.mark.slow
async def test_fuzz_decoder_intake_and_reassembly_long() -> None:
    await run(LONG, seed=20261204)
