"""SMPP 3.4 PDUs: the header, the bodies we send and read, and their TLVs.

Only what an ESME needs: the three binds and their responses, submit_sm(_resp),
deliver_sm(_resp), data_sm(_resp), enquire_link(_resp), unbind(_resp) and
generic_nack. Octet strings stay ``bytes``; C-Octet Strings we write are ASCII
(addresses, ids), which SMPP 3.4 section 3.1 requires; those we read are kept octet for
octet (Latin-1), so a non-ASCII address can be refused rather than misread.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

HEADER = struct.Struct(">IIII")
MAX_PDU = 65536  # far above any PDU we expect; a bigger length means a broken stream


class Command(IntEnum):
    """command_id values (SMPP 3.4 section 5.1.2.1)."""

    GENERIC_NACK = 0x80000000
    BIND_RECEIVER = 0x00000001
    BIND_RECEIVER_RESP = 0x80000001
    BIND_TRANSMITTER = 0x00000002
    BIND_TRANSMITTER_RESP = 0x80000002
    BIND_TRANSCEIVER = 0x00000009
    BIND_TRANSCEIVER_RESP = 0x80000009
    DATA_SM = 0x00000103
    DATA_SM_RESP = 0x80000103
    SUBMIT_SM = 0x00000004
    SUBMIT_SM_RESP = 0x80000004
    DELIVER_SM = 0x00000005
    DELIVER_SM_RESP = 0x80000005
    UNBIND = 0x00000006
    UNBIND_RESP = 0x80000006
    ENQUIRE_LINK = 0x00000015
    ENQUIRE_LINK_RESP = 0x80000015


class Status(IntEnum):
    """Every command_status of SMPP 3.4 section 5.1.3."""

    ROK = 0x00000000
    RINVMSGLEN = 0x00000001
    RINVCMDLEN = 0x00000002
    RINVCMDID = 0x00000003
    RINVBNDSTS = 0x00000004
    RALYBND = 0x00000005
    RINVPRTFLG = 0x00000006
    RINVREGDLVFLG = 0x00000007
    RSYSERR = 0x00000008
    RINVSRCADR = 0x0000000A
    RINVDSTADR = 0x0000000B
    RINVMSGID = 0x0000000C
    RBINDFAIL = 0x0000000D
    RINVPASWD = 0x0000000E
    RINVSYSID = 0x0000000F
    RCANCELFAIL = 0x00000011
    RREPLACEFAIL = 0x00000013
    RMSGQFUL = 0x00000014
    RINVSERTYP = 0x00000015
    RINVNUMDESTS = 0x00000033
    RINVDLNAME = 0x00000034
    RINVDESTFLAG = 0x00000040
    RINVSUBREP = 0x00000042
    RINVESMCLASS = 0x00000043
    RCNTSUBDL = 0x00000044
    RSUBMITFAIL = 0x00000045
    RINVSRCTON = 0x00000048
    RINVSRCNPI = 0x00000049
    RINVDSTTON = 0x00000050
    RINVDSTNPI = 0x00000051
    RINVSYSTYP = 0x00000053
    RINVREPFLAG = 0x00000054
    RINVNUMMSGS = 0x00000055
    RTHROTTLED = 0x00000058
    RINVSCHED = 0x00000061
    RINVEXPIRY = 0x00000062
    RINVDFTMSGID = 0x00000063
    RX_T_APPN = 0x00000064
    RX_P_APPN = 0x00000065
    RX_R_APPN = 0x00000066
    RQUERYFAIL = 0x00000067
    RINVOPTPARSTREAM = 0x000000C0
    ROPTPARNOTALLWD = 0x000000C1
    RINVPARLEN = 0x000000C2
    RMISSINGOPTPARAM = 0x000000C3
    RINVOPTPARAMVAL = 0x000000C4
    RDELIVERYFAILURE = 0x000000FE
    RUNKNOWNERR = 0x000000FF


class Retry(IntEnum):
    """What an error status in a submit_sm_resp means for the message."""

    PERMANENT = 0  # the SMSC will never take this message: dead-letter it
    LATER = 1  # a transient failure: the core retries with its backoff
    SLOW_DOWN = 2  # pause every submit, then retry here (throttle_backoff)
    REBIND = 3  # the session is in a bad state: drop it, rebind, retry later


# The one table of SMPP 3.4 statuses that are not permanent (docs/transports/smpp.md
# repeats it). Everything else, including statuses SMPP 3.4 does not define, is
# permanent: a retry of the same PDU meets the same refusal. As in Kannel, a system
# error or a temporary application error is worth a retry; RINVBNDSTS says the SMSC
# thinks we are not bound, so the session is replaced.
RETRY: dict[int, Retry] = {
    0x00000004: Retry.REBIND,  # ESME_RINVBNDSTS
    0x00000008: Retry.LATER,  # ESME_RSYSERR
    0x00000014: Retry.SLOW_DOWN,  # ESME_RMSGQFUL
    0x00000058: Retry.SLOW_DOWN,  # ESME_RTHROTTLED
    0x00000064: Retry.LATER,  # ESME_RX_T_APPN
    0x000000FE: Retry.LATER,  # ESME_RDELIVERYFAILURE (SMPP 5.0, seen from 3.4 SMSCs)
}


def retry_of(status: int) -> Retry:
    """How to treat a failed submit with this status (see :data:`RETRY`)."""
    return RETRY.get(status, Retry.PERMANENT)


class Tag(IntEnum):
    """Optional parameter tags (SMPP 3.4 section 5.3.2)."""

    RECEIPTED_MESSAGE_ID = 0x001E
    SAR_MSG_REF_NUM = 0x020C
    SAR_TOTAL_SEGMENTS = 0x020E
    SAR_SEGMENT_SEQNUM = 0x020F
    MESSAGE_PAYLOAD = 0x0424
    MESSAGE_STATE = 0x0427
    SC_INTERFACE_VERSION = 0x0210


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


class ResponseError(PduError):
    """The answer to a request was a generic_nack, or a response to another command."""

    def __init__(self, request: int, response: Pdu) -> None:
        super().__init__(
            f"{Pdu(request, 0, 0).command_name} answered by {response.command_name}"
            f" ({status_name(response.status)})"
        )
        self.response = response
        # A generic_nack with status 0 is still a refusal: never mistake it for success.
        self.status = response.status or Status.RSYSERR


def response_id(command_id: int) -> int:
    return command_id | 0x80000000


# The mandatory body of each response we send (SMPP 3.4 chapter 4): deliver_sm_resp and
# data_sm_resp carry a message_id, "unused" and so a single NUL octet; a 16-octet PDU
# without it makes strict SMSCs drop the session. The others have no body.
RESPONSE_BODY: dict[int, bytes] = {
    0x80000005: b"\x00",  # deliver_sm_resp
    0x80000103: b"\x00",  # data_sm_resp
}


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
        # Latin-1 keeps every octet: a non-ASCII address is then refused by what reads
        # it, instead of becoming U+FFFD and passing as something else.
        value = self._body[self._at : end].decode("latin-1")
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
        if self._at != len(self._body):
            raise PduError("trailing octets after the last TLV")
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
        """A submit_sm or deliver_sm body."""
        r = Reader(body)
        head = _addressing(r)
        esm_class, protocol_id, priority = r.u8(), r.u8(), r.u8()
        schedule, validity = r.cstring(), r.cstring()
        registered, replace, data_coding, default_id = r.u8(), r.u8(), r.u8(), r.u8()
        short_message = r.octets(r.u8())
        return cls(
            **head,
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

    @classmethod
    def decode_data_sm(cls, body: bytes) -> ShortMessage:
        """A data_sm (SMPP 3.4 section 4.7.1): no short_message, the text is in
        ``message_payload``; the fields it lacks keep their defaults."""
        r = Reader(body)
        head = _addressing(r)
        esm_class, registered, data_coding = r.u8(), r.u8(), r.u8()
        return cls(
            **head,
            esm_class=esm_class,
            registered_delivery=registered,
            data_coding=data_coding,
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


def _addressing(r: Reader) -> dict[str, Any]:
    """service_type and both addresses: the first fields of submit_sm, deliver_sm, data_sm."""
    service_type = r.cstring()
    source_ton, source_npi, source = r.u8(), r.u8(), r.cstring()
    dest_ton, dest_npi, dest = r.u8(), r.u8(), r.cstring()
    return {
        "service_type": service_type,
        "source_addr_ton": source_ton,
        "source_addr_npi": source_npi,
        "source_addr": source,
        "dest_addr_ton": dest_ton,
        "dest_addr_npi": dest_npi,
        "destination_addr": dest,
    }


def message_id(body: bytes) -> str:
    """The message_id of a submit_sm_resp (empty when the SMSC refused the submit)."""
    return Reader(body).cstring() if body else ""


def system_id(body: bytes) -> str:
    """The SMSC's system_id from a bind_transceiver_resp."""
    return Reader(body).cstring() if body else ""
