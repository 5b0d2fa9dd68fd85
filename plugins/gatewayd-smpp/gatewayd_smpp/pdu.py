"""SMPP 3.4 PDUs: the header, the bodies we send and read, and their TLVs.

Only what an ESME bound as a transceiver needs: bind_transceiver(_resp),
submit_sm(_resp), deliver_sm(_resp), enquire_link(_resp), unbind(_resp) and
generic_nack. Octet strings stay ``bytes``; C-Octet Strings are ASCII (addresses,
ids), which SMPP 3.4 section 3.1 requires.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct(">IIII")
MAX_PDU = 65536  # far above any PDU we expect; a bigger length means a broken stream


class Command(IntEnum):
    """command_id values (SMPP 3.4 section 5.1.2.1)."""

    GENERIC_NACK = 0x80000000
    BIND_TRANSCEIVER = 0x00000009
    BIND_TRANSCEIVER_RESP = 0x80000009
    SUBMIT_SM = 0x00000004
    SUBMIT_SM_RESP = 0x80000004
    DELIVER_SM = 0x00000005
    DELIVER_SM_RESP = 0x80000005
    UNBIND = 0x00000006
    UNBIND_RESP = 0x80000006
    ENQUIRE_LINK = 0x00000015
    ENQUIRE_LINK_RESP = 0x80000015


class Status(IntEnum):
    """command_status values we produce or act on (SMPP 3.4 section 5.1.3)."""

    ROK = 0x00000000
    RINVMSGLEN = 0x00000001
    RINVCMDLEN = 0x00000002
    RINVCMDID = 0x00000003
    RSYSERR = 0x00000008
    RINVSRCADR = 0x0000000A
    RINVDSTADR = 0x0000000B
    RBINDFAIL = 0x0000000D
    RINVPASWD = 0x0000000E
    RINVSYSID = 0x0000000F
    RMSGQFUL = 0x00000014
    RTHROTTLED = 0x00000058
    RX_T_APPN = 0x00000064
    RX_P_APPN = 0x00000065
    RX_R_APPN = 0x00000066


class Tag(IntEnum):
    """Optional parameter tags (SMPP 3.4 section 5.3.2)."""

    RECEIPTED_MESSAGE_ID = 0x001E
    SAR_MSG_REF_NUM = 0x020C
    SAR_TOTAL_SEGMENTS = 0x020E
    SAR_SEGMENT_SEQNUM = 0x020F
    MESSAGE_PAYLOAD = 0x0424
    MESSAGE_STATE = 0x0427


# esm_class bits (section 5.2.12): the message type lives in bits 5..2.
ESM_UDHI = 0x40
ESM_TYPE_MASK = 0x3C
ESM_TYPE_RECEIPT = 0x04
ESM_TYPE_INTERMEDIATE = 0x20

# The statuses after which the peer's credentials or identity are wrong: retrying at
# full speed cannot help, so the reconnect loop backs off to its maximum.
BIND_AUTH_FAILURES = frozenset({Status.RBINDFAIL, Status.RINVPASWD, Status.RINVSYSID})


class PduError(Exception):
    """A PDU that cannot be parsed: the stream is broken or the peer is not SMPP."""


def status_name(status: int) -> str:
    """``ESME_RTHROTTLED`` for 0x58; hex for statuses we have no name for."""
    try:
        return f"ESME_{Status(status).name}"
    except ValueError:
        return f"0x{status:08X}"


@dataclass(frozen=True, slots=True)
class Pdu:
    """One PDU: the header fields and the raw body after it."""

    command_id: int
    status: int
    sequence: int
    body: bytes = b""

    @property
    def is_response(self) -> bool:
        return bool(self.command_id & 0x80000000)

    def encode(self) -> bytes:
        return (
            HEADER.pack(HEADER.size + len(self.body), self.command_id, self.status, self.sequence)
            + self.body
        )

    @property
    def command_name(self) -> str:
        try:
            return Command(self.command_id).name.lower()
        except ValueError:
            return f"0x{self.command_id:08x}"


def parse_header(data: bytes) -> tuple[int, int, int, int]:
    """(command_length, command_id, command_status, sequence_number)."""
    length, command_id, status, sequence = HEADER.unpack(data)
    if not HEADER.size <= length <= MAX_PDU:
        raise PduError(f"impossible command_length {length}")
    return length, command_id, status, sequence


# --- field writers and readers ----------------------------------------------------------


def cstring(value: str, limit: int) -> bytes:
    """A C-Octet String: ASCII plus NUL, at most ``limit`` octets with the NUL."""
    raw = value.encode("ascii")
    if len(raw) >= limit:
        raise ValueError(f"{value!r} is longer than {limit - 1} octets")
    return raw + b"\x00"


def tlv(tag: int, value: bytes) -> bytes:
    return struct.pack(">HH", tag, len(value)) + value


class Reader:
    """Walks a PDU body field by field; a short body raises :class:`PduError`."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._at = 0

    def cstring(self) -> str:
        end = self._body.find(b"\x00", self._at)
        if end < 0:
            raise PduError("C-Octet String without NUL")
        value = self._body[self._at : end].decode("ascii", errors="replace")
        self._at = end + 1
        return value

    def u8(self) -> int:
        if self._at >= len(self._body):
            raise PduError("body ends inside an integer field")
        value = self._body[self._at]
        self._at += 1
        return value

    def octets(self, length: int) -> bytes:
        if self._at + length > len(self._body):
            raise PduError("body ends inside an octet string")
        value = self._body[self._at : self._at + length]
        self._at += length
        return value

    def tlvs(self) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        while self._at + 4 <= len(self._body):
            tag, length = struct.unpack_from(">HH", self._body, self._at)
            self._at += 4
            found[tag] = self.octets(length)
        return found


# --- bodies -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Bind:
    """bind_transceiver's body. ``repr=False``: the password must never reach a log."""

    system_id: str
    password: str
    system_type: str = ""
    addr_ton: int = 0
    addr_npi: int = 0
    address_range: str = ""

    def encode(self) -> bytes:
        return (
            cstring(self.system_id, 16)
            + cstring(self.password, 9)
            + cstring(self.system_type, 13)
            + bytes([0x34, self.addr_ton, self.addr_npi])  # interface_version 3.4
            + cstring(self.address_range, 41)
        )

    def __repr__(self) -> str:
        return f"Bind(system_id={self.system_id!r}, system_type={self.system_type!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class ShortMessage:
    """The shared body of submit_sm and deliver_sm (SMPP 3.4 sections 4.4.1, 4.6.1).

    ``short_message`` is the raw octets, including a UDH when ``esm_class`` has UDHI.
    """

    service_type: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    destination_addr: str = ""
    esm_class: int = 0
    protocol_id: int = 0
    priority_flag: int = 0
    schedule_delivery_time: str = ""
    validity_period: str = ""
    registered_delivery: int = 0
    replace_if_present_flag: int = 0
    data_coding: int = 0
    sm_default_msg_id: int = 0
    short_message: bytes = b""
    tlvs: Mapping[int, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        if len(self.short_message) > 254:
            raise ValueError("short_message is limited to 254 octets; use message_payload")
        head = (
            cstring(self.service_type, 6)
            + bytes([self.source_addr_ton, self.source_addr_npi])
            + cstring(self.source_addr, 21)
            + bytes([self.dest_addr_ton, self.dest_addr_npi])
            + cstring(self.destination_addr, 21)
            + bytes([self.esm_class, self.protocol_id, self.priority_flag])
            + cstring(self.schedule_delivery_time, 17)
            + cstring(self.validity_period, 17)
            + bytes(
                [
                    self.registered_delivery,
                    self.replace_if_present_flag,
                    self.data_coding,
                    self.sm_default_msg_id,
                    len(self.short_message),
                ]
            )
            + self.short_message
        )
        return head + b"".join(tlv(tag, value) for tag, value in self.tlvs.items())

    @classmethod
    def decode(cls, body: bytes) -> ShortMessage:
        r = Reader(body)
        service_type = r.cstring()
        source_ton, source_npi = r.u8(), r.u8()
        source = r.cstring()
        dest_ton, dest_npi = r.u8(), r.u8()
        dest = r.cstring()
        esm_class, protocol_id, priority = r.u8(), r.u8(), r.u8()
        schedule, validity = r.cstring(), r.cstring()
        registered, replace, data_coding, default_id = r.u8(), r.u8(), r.u8(), r.u8()
        short_message = r.octets(r.u8())
        return cls(
            service_type=service_type,
            source_addr_ton=source_ton,
            source_addr_npi=source_npi,
            source_addr=source,
            dest_addr_ton=dest_ton,
            dest_addr_npi=dest_npi,
            destination_addr=dest,
            esm_class=esm_class,
            protocol_id=protocol_id,
            priority_flag=priority,
            schedule_delivery_time=schedule,
            validity_period=validity,
            registered_delivery=registered,
            replace_if_present_flag=replace,
            data_coding=data_coding,
            sm_default_msg_id=default_id,
            short_message=short_message,
            tlvs=r.tlvs(),
        )

    def tlv_int(self, tag: int) -> int | None:
        value = self.tlvs.get(tag)
        return int.from_bytes(value, "big") if value else None

    def tlv_cstring(self, tag: int) -> str | None:
        value = self.tlvs.get(tag)
        if value is None:
            return None
        return value.split(b"\x00", 1)[0].decode("ascii", errors="replace")


def message_id(body: bytes) -> str:
    """The message_id of a submit_sm_resp (empty when the SMSC refused the submit)."""
    return Reader(body).cstring() if body else ""


def system_id(body: bytes) -> str:
    """The SMSC's system_id from a bind_transceiver_resp."""
    return Reader(body).cstring() if body else ""
