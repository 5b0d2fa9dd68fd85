"""Units below the wire: GSM 03.38, segmentation limits, UDH and receipt parsing."""

from __future__ import annotations

from gatewayd_smpp import codec, gsm0338, receipts
from gatewayd_smpp.pdu import Bind, ShortMessage, Tag


def test_gsm_round_trip_with_extension_table() -> None:
    text = "@£$¥ ΔΦΓ ^{}\\[~]| € äöñüà"
    encoded = gsm0338.encode(text)
    assert encoded is not None
    assert encoded[:3] == bytes([0x00, 0x01, 0x02])
    assert gsm0338.decode(encoded) == text
    assert gsm0338.encode("€") == b"\x1b\x65"
    assert gsm0338.encode("ж") is None


def test_single_part_limits() -> None:
    assert len(codec.segment("a" * 160, policy="auto", ref=1)) == 1
    assert len(codec.segment("a" * 161, policy="auto", ref=1)) == 2
    assert len(codec.segment("ж" * 70, policy="auto", ref=1)) == 1
    assert len(codec.segment("ж" * 71, policy="auto", ref=1)) == 2
    # The ucs2 policy never uses GSM, even for plain ASCII.
    (part,) = codec.segment("abc", policy="ucs2", ref=1)
    assert part.data_coding == codec.DC_UCS2


def test_surrogate_pairs_stay_in_one_part() -> None:
    # 73 UTF-16 units: two parts; unit 67 would be half of the emoji, so it moves on.
    parts = codec.segment("x" * 66 + "😀" + "y" * 5, policy="auto", ref=7)
    texts = [p.short_message[6:].decode("utf-16-be") for p in parts]
    assert texts == ["x" * 66, "😀yyyyy"]


def test_concat_ie_parsing() -> None:
    assert codec.concat_from_udh(bytes([5, 0, 3, 9, 2, 1])) == codec.Concat(
        ref=9, total=2, seq=1, wide_ref=False
    )
    # Another IE first (port addressing), then the 16-bit reference.
    udh = bytes([10, 5, 4, 0, 1, 0, 2, 8, 4, 0x12, 0x34, 3, 2])
    assert codec.concat_from_udh(udh) == codec.Concat(ref=0x1234, total=3, seq=2, wide_ref=True)
    assert codec.concat_from_udh(bytes([3, 5, 1, 0])) is None


def test_receipt_prefers_tlvs_and_falls_back_to_text() -> None:
    text = (
        b"id:abc sub:001 dlvrd:000 submit date:2401010000 done date:2401010001 stat:EXPIRED err:012"
    )
    by_text = receipts.parse(ShortMessage(esm_class=4, short_message=text))
    assert by_text == receipts.Receipt(message_id="abc", state=3, error="012")
    with_tlvs = ShortMessage(
        esm_class=4,
        short_message=text,
        tlvs={Tag.RECEIPTED_MESSAGE_ID: b"XYZ\x00", Tag.MESSAGE_STATE: b"\x02"},
    )
    parsed = receipts.parse(with_tlvs)
    assert parsed is not None
    assert (parsed.message_id, parsed.delivered) == ("XYZ", True)


def test_short_message_round_trip_and_bind_repr() -> None:
    sm = ShortMessage(
        source_addr="4000",
        destination_addr="447700900001",
        esm_class=0x40,
        data_coding=8,
        short_message=b"\x05\x00\x03\x01\x02\x01abc",
        tlvs={Tag.MESSAGE_STATE: b"\x02"},
    )
    assert ShortMessage.decode(sm.encode()) == sm
    assert "pw" not in repr(Bind(system_id="id", password="pw"))
