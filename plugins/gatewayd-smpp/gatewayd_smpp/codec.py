"""Text <-> short_message octets: data_coding choice, segmentation with UDH, and back.

Outgoing text is GSM 03.38 (data_coding 0) when every character is in the default
alphabet or its extension table, else UCS-2 (data_coding 8, UTF-16BE). data_coding is
always set explicitly, because SMSCs differ on what "SMSC default" (0) means and some
libraries relabel text they think is ASCII (see docs/transports/smpp.md).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gatewayd_smpp import gsm0338

DC_GSM = 0x00
DC_ASCII = 0x01
DC_LATIN1 = 0x03
DC_UCS2 = 0x08

# One part without a UDH, and per part of a concatenated message with the 6-octet
# 8-bit-reference UDH (TS 23.040 9.2.3.24.1): 160 - 7 septets, 140 - 6 octets.
GSM_SINGLE = 160
GSM_PART = 153
UCS2_SINGLE = 70
UCS2_PART = 67
MAX_PARTS = 255

IE_CONCAT_8 = 0x00
IE_CONCAT_16 = 0x08


class EncodingError(ValueError):
    """Text that cannot be sent: too long for 255 parts."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Part:
    """One short message as it goes into a submit_sm."""

    data_coding: int
    short_message: bytes  # UDH (when udhi) + text octets
    udhi: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Concat:
    """Where one part belongs: (ref, total, seq) from a UDH IE or the SAR TLVs."""

    ref: int
    total: int
    seq: int
    wide_ref: bool  # 16-bit reference (IE 0x08 or SAR) vs 8-bit (IE 0x00)


def choose_coding(text: str, policy: str) -> int:
    """data_coding for ``text`` under ``policy`` ("auto": GSM when encodable; "ucs2")."""
    if policy == "auto" and gsm0338.encode(text) is not None:
        return DC_GSM
    return DC_UCS2


def segment(text: str, *, policy: str, ref: int) -> list[Part]:
    """Split ``text`` into parts; several parts carry the 8-bit concatenation UDH.

    GSM parts never split an escape sequence; UCS-2 parts never split a surrogate pair,
    so every part decodes on its own (handsets show parts before they reassemble).
    """
    coding = choose_coding(text, policy)
    if coding == DC_GSM:
        units = [gsm0338.encode(ch) or b"" for ch in text]
        single, per_part = GSM_SINGLE, GSM_PART
    else:
        units = _utf16_units(text)
        single, per_part = UCS2_SINGLE * 2, UCS2_PART * 2
    whole = b"".join(units)
    if len(whole) <= single:
        return [Part(data_coding=coding, short_message=whole, udhi=False)]
    chunks = _pack(units, per_part)
    if len(chunks) > MAX_PARTS:
        raise EncodingError(f"the text needs {len(chunks)} parts; SMS allows {MAX_PARTS}")
    total = len(chunks)
    return [
        Part(
            data_coding=coding,
            short_message=bytes([5, IE_CONCAT_8, 3, ref & 0xFF, total, i]) + chunk,
            udhi=True,
        )
        for i, chunk in enumerate(chunks, start=1)
    ]


def encode_whole(text: str, coding: int) -> bytes:
    """All of ``text`` in one octet string (for message_payload: the SMSC segments)."""
    if coding == DC_GSM:
        return gsm0338.encode(text) or b""
    return text.encode("utf-16-be")


def _utf16_units(text: str) -> list[bytes]:
    # One entry per character: a character outside the BMP is a 4-octet surrogate pair
    # and must stay in one part.
    return [ch.encode("utf-16-be") for ch in text]


def _pack(units: list[bytes], limit: int) -> list[bytes]:
    chunks: list[bytes] = []
    current = bytearray()
    for unit in units:
        if len(current) + len(unit) > limit:
            chunks.append(bytes(current))
            current = bytearray()
        current += unit
    if current:
        chunks.append(bytes(current))
    return chunks


def split_udh(short_message: bytes, udhi: bool) -> tuple[bytes, bytes]:
    """(UDH including its length octet, text octets); the UDH is empty without UDHI."""
    if not udhi or not short_message:
        return b"", short_message
    length = short_message[0] + 1
    if length > len(short_message):
        raise ValueError("UDH longer than the short message")
    return short_message[:length], short_message[length:]


def concat_from_udh(udh: bytes) -> Concat | None:
    """The concatenation IE of a UDH (8-bit or 16-bit reference), if there is one."""
    at = 1
    while at + 2 <= len(udh):
        iei, length = udh[at], udh[at + 1]
        data = udh[at + 2 : at + 2 + length]
        if iei == IE_CONCAT_8 and length == 3 and len(data) == 3:
            return Concat(ref=data[0], total=data[1], seq=data[2], wide_ref=False)
        if iei == IE_CONCAT_16 and length == 4 and len(data) == 4:
            (ref,) = struct.unpack(">H", data[:2])
            return Concat(ref=ref, total=data[2], seq=data[3], wide_ref=True)
        at += 2 + length
    return None


class CodingError(ValueError):
    """A data_coding we cannot turn into text; the message says why (for the log)."""


# SMPP 3.4 section 5.2.19 gives the values 0x00..0x0F its own meanings; text ones map to
# a Python codec. 0x02/0x04 are binary, 0x09 pictograms, 0x05/0x0D JIS variants: no text.
_SMPP_TEXT = {
    DC_GSM: "gsm",
    DC_ASCII: "ascii",
    DC_LATIN1: "latin-1",
    0x06: "iso8859-5",  # Cyrillic
    0x07: "iso8859-8",  # Latin/Hebrew
    DC_UCS2: "ucs2",
    0x0A: "iso2022-jp",  # music codes (ISO-2022-JP)
    0x0E: "euc-kr",  # KS C 5601
}


def alphabet(data_coding: int) -> str:
    """The text alphabet of ``data_coding`` (a Python codec name, ``gsm`` or ``ucs2``).

    Raises :class:`CodingError` naming the reason for data that is not text, compressed
    text (TS 23.038 compression is not implemented by any SMSC we know of) and
    reserved values.
    """
    if data_coding < 0x10:
        if data_coding in _SMPP_TEXT:
            return _SMPP_TEXT[data_coding]
        raise CodingError(f"data_coding 0x{data_coding:02x} is not text")
    group = data_coding >> 4
    if group <= 0x07:
        # TS 23.038 groups 00xx (general) and 01xx (marked for automatic deletion):
        # bit 5 = compressed, bits 3..2 = alphabet.
        if data_coding & 0x20:
            raise CodingError(f"data_coding 0x{data_coding:02x}: compressed text is not supported")
        chosen = (data_coding >> 2) & 0x03
        if chosen == 0:
            return "gsm"
        if chosen == 2:
            return "ucs2"
        kind = "8-bit data, not text" if chosen == 1 else "a reserved alphabet"
        raise CodingError(f"data_coding 0x{data_coding:02x}: {kind}")
    if group in (0x0C, 0x0D):
        return "gsm"  # message waiting indication, discard / store: GSM default alphabet
    if group == 0x0E:
        return "ucs2"  # message waiting indication, store: UCS-2
    if group == 0x0F:
        if data_coding & 0x04:
            raise CodingError(f"data_coding 0x{data_coding:02x}: 8-bit data, not text")
        return "gsm"
    raise CodingError(f"data_coding 0x{data_coding:02x} is reserved (TS 23.038)")


def decode_text(data_coding: int, octets: bytes) -> str:
    """The text of a short message; :class:`CodingError` for a coding that is not text."""
    name = alphabet(data_coding)
    if name == "gsm":
        return gsm0338.decode(octets)
    if name == "ucs2":
        # A lone surrogate split by a careless sender becomes U+FFFD, not an error.
        return octets.decode("utf-16-be", errors="replace")
    return octets.decode(name, errors="replace")


def decode_parts(parts: list[tuple[int, bytes]]) -> str:
    """The text of parts given as (data_coding, octets), each decoded with its own coding.

    Parts that share one alphabet are decoded together, so a UCS-2 surrogate pair that
    a sender split across two parts still comes out whole.
    """
    names = {alphabet(dc) for dc, _ in parts}
    if len(names) == 1:
        return decode_text(parts[0][0], b"".join(octets for _, octets in parts))
    return "".join(decode_text(dc, octets) for dc, octets in parts)
