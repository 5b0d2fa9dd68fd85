"""The GSM 03.38 default alphabet (3GPP TS 23.038 section 6.2.1), basic and extension table.

SMPP carries data_coding 0 unpacked: one septet per octet, so a septet count is also
an octet count on the wire. Extension characters take two septets (ESC + code).
"""

from __future__ import annotations

ESC = 0x1B

# Index = septet value. 0x1B is the escape to the extension table, never a character.
_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
_EXTENSION = {
    0x0A: "\f",
    0x14: "^",
    0x28: "{",
    0x29: "}",
    0x2F: "\\",
    0x3C: "[",
    0x3D: "~",
    0x3E: "]",
    0x40: "|",
    0x65: "€",
}

_ENCODE: dict[str, bytes] = {ch: bytes([i]) for i, ch in enumerate(_BASIC) if i != ESC}
_ENCODE.update({ch: bytes([ESC, code]) for code, ch in _EXTENSION.items()})


def encode(text: str) -> bytes | None:
    """The unpacked septets of ``text``, or ``None`` when a character is not in the alphabet."""
    out = bytearray()
    for ch in text:
        septets = _ENCODE.get(ch)
        if septets is None:
            return None
        out += septets
    return bytes(out)


def char_septets(ch: str) -> int:
    """How many septets one encodable character takes (1, or 2 for the extension table)."""
    return len(_ENCODE[ch])


def decode(data: bytes) -> str:
    """Decode unpacked septets. An unknown escape yields the basic-table character, as
    TS 23.038 asks of a receiver; octets above 0x7F are masked to seven bits."""
    out: list[str] = []
    escaped = False
    for octet in data:
        septet = octet & 0x7F
        if escaped:
            escaped = False
            out.append(_EXTENSION.get(septet, _BASIC[septet] if septet != ESC else " "))
        elif septet == ESC:
            escaped = True
        else:
            out.append(_BASIC[septet])
    return "".join(out)
