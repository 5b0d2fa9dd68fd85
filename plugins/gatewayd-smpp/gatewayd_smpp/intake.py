"""MO intake: a deliver_sm (or all parts of one) becomes an Uplink; the ack follows the store.

The deliver_sm_resp is the SMSC's only evidence that we took a message: it is sent
with ESME_ROK only after ``context.accept()`` returned, i.e. after the store committed.
A refusal maps to a status that tells the SMSC whether to retry:

- store full (BacklogFullError) -> ESME_RMSGQFUL: the SMSC keeps the message, retries;
- device not mapped (UnknownDeviceError) or refused by the server (DeviceRefusedError)
  -> ESME_RINVSRCADR: a retry cannot help;
- not a valid message (InvalidMessageError, undecodable coding) -> ESME_RX_P_APPN;
- anything unexpected (store I/O) -> ESME_RX_T_APPN: temporary, retry later.

A source_addr that is not an MSISDN (digits, at most 15, an optional leading "+") is
refused with ESME_RINVSRCADR before anything is learned: the gateway could never send
an SMS back to it. What the transport refuses itself (that source, a bad UDH, a part
number out of range, an undecodable coding) is kept in the gateway's dead-letter queue
through ``context.reject`` before it is answered, like every permanent refusal. MO
arrives in deliver_sm or data_sm; both are answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gatewayd.api import (
    BacklogFullError,
    DeviceRefusedError,
    IntakeRefusedError,
    InvalidMessageError,
    Logger,
    Rejection,
    TransportContext,
    UnknownDeviceError,
    Uplink,
)
from gatewayd_smpp import codec, receipts
from gatewayd_smpp.concat import Reassembler
from gatewayd_smpp.config import SmppConfig
from gatewayd_smpp.pdu import (
    ESM_TYPE_INTERMEDIATE,
    ESM_TYPE_MASK,
    ESM_TYPE_RECEIPT,
    ESM_UDHI,
    Command,
    Pdu,
    PduError,
    ShortMessage,
    Status,
    Tag,
    status_name,
)
from gatewayd_smpp.session import Session

_REFUSAL_STATUS: dict[type[IntakeRefusedError], int] = {
    BacklogFullError: Status.RMSGQFUL,
    UnknownDeviceError: Status.RINVSRCADR,
    DeviceRefusedError: Status.RINVSRCADR,
    InvalidMessageError: Status.RX_P_APPN,
}


def refusal_status(exc: IntakeRefusedError) -> int:
    """The SMPP status for a refusal: a final one the SMSC will not resend for a permanent
    refusal, a temporary one (the SMSC retries) otherwise."""
    for cls, status in _REFUSAL_STATUS.items():
        if isinstance(exc, cls):
            return status
    return Status.RX_P_APPN if exc.permanent else Status.RX_T_APPN


MAX_MSISDN = 15  # digits of an E.164 number


def valid_msisdn(addr: str) -> bool:
    """An MSISDN as SMPP carries it: digits only (after an optional "+"), 1..15 of them."""
    digits = addr.removeprefix("+")
    return digits.isascii() and digits.isdigit() and len(digits) <= MAX_MSISDN


@dataclass(slots=True)
class Held:
    """A deliver_sm whose response we still owe (one per part of a multi-part message).

    ``copies`` are earlier copies of the same part that the SMSC resent before we
    answered: they get the same answer, since every request gets a response.
    """

    session: Session
    pdu: Pdu
    answered: bool = False
    copies: list[Held] = field(default_factory=list)

    async def answer(self, status: int) -> None:
        for copy in self.copies:
            await copy.answer(status)
        self.copies.clear()
        if not self.answered:
            self.answered = True
            await self.session.respond(self.pdu, status)


class Intake:
    """Handles every deliver_sm of the transport's sessions."""

    def __init__(
        self,
        config: SmppConfig,
        context: TransportContext,
        book: receipts.ReceiptBook,
        log: Logger,
        on_unclaimed: Callable[[receipts.Receipt], Awaitable[None]],
    ) -> None:
        self._config = config
        self._context = context
        self._book = book
        self._log = log
        self._on_unclaimed = on_unclaimed
        self._parts: Reassembler[Held] = Reassembler(config.part_timeout)

    async def on_deliver(self, session: Session, pdu: Pdu) -> None:
        """The session's deliver_sm handler."""
        held = Held(session, pdu)
        try:
            if pdu.command_id == Command.DATA_SM:
                sm = ShortMessage.decode_data_sm(pdu.body)
            else:
                sm = ShortMessage.decode(pdu.body)
        except PduError as exc:
            self._log.warning("smpp.mo.refused", reason="malformed", error=str(exc))
            await held.answer(Status.RINVMSGLEN)
            return
        kind = sm.esm_class & ESM_TYPE_MASK
        if kind == ESM_TYPE_RECEIPT:
            await self._receipt(sm, held)
        elif kind == ESM_TYPE_INTERMEDIATE:
            await held.answer(Status.ROK)  # intermediate notification: nothing to do
        else:
            await self._mo(sm, held)

    async def _receipt(self, sm: ShortMessage, held: Held) -> None:
        receipt = receipts.parse(sm)
        if receipt is None:
            self._log.warning("smpp.receipt.unreadable", source=sm.source_addr)
        elif receipt.final and self._book.resolve(receipt) is receipts.Match.UNCLAIMED:
            # Nobody here waits for it: it overtook its submit's task, or it belongs to a
            # message submitted before a restart. Either way it is written down (kept
            # until receipt_timeout) before the SMSC hears we have it. An ambiguous one
            # (it could name several submits) is not: the book keeps it, nobody guesses.
            try:
                await self._on_unclaimed(receipt)
            except Exception as exc:
                self._log.warning(
                    "smpp.receipt.unmatched", smsc_message_id=receipt.message_id, error=repr(exc)
                )
                await held.answer(Status.RX_T_APPN)
                return
        # A receipt is only information for us; acking it at once stops SMSC resends.
        await held.answer(Status.ROK)

    async def _mo(self, sm: ShortMessage, held: Held) -> None:
        udhi = bool(sm.esm_class & ESM_UDHI)
        raw = sm.short_message or sm.tlvs.get(Tag.MESSAGE_PAYLOAD, b"")
        if not valid_msisdn(sm.source_addr):
            status = await self._reject(
                self._log.bind(source=sm.source_addr.encode("latin-1").hex()),
                Status.RINVSRCADR,
                Rejection(
                    device=sm.source_addr,
                    reason="invalid_source",
                    detail="source_addr is not an MSISDN",
                    content=raw,
                ),
            )
            await held.answer(status)
            return
        device = sm.source_addr.removeprefix("+")
        try:
            udh, octets = codec.split_udh(raw, udhi)
        except ValueError:
            detail = "the user data header is malformed"
            status = await self._reject(
                self._log.bind(device=device),
                Status.RX_P_APPN,
                Rejection(device=device, reason="bad_udh", detail=detail, content=raw),
            )
            await held.answer(status)
            return
        concat = codec.concat_from_udh(udh) or _sar(sm)
        if concat is None or concat.total <= 1:
            texts = [(sm.data_coding, octets)]
            await self._accept(sm, device, sm.data_coding, texts, (held,), concat_key="")
            return
        if not 1 <= concat.seq <= concat.total:
            detail = f"part {concat.seq} of {concat.total}"
            status = await self._reject(
                self._log.bind(device=device),
                Status.RX_P_APPN,
                Rejection(device=device, reason="bad_part_number", detail=detail, content=raw),
            )
            await held.answer(status)
            return
        complete, replaced = self._parts.add(
            source=device,
            dest=sm.destination_addr,
            concat=concat,
            data_coding=sm.data_coding,
            octets=octets,
            holder=held,
        )
        if replaced is not None:
            # The SMSC resent a part before we answered the first copy: that copy is
            # answered with its successor (or already was, on arrival).
            held.copies.append(replaced)
        if complete is None:
            if self._config.part_ack == "on_arrival":
                await held.answer(Status.ROK)
            return
        status = await self._accept(
            sm,
            device,
            complete.data_coding,
            complete.texts,
            complete.holders,
            concat_key=f"{concat.ref}/{concat.total}/{int(concat.wide_ref)}",
            parts=len(complete.parts),
        )
        if status != Status.ROK and self._config.part_ack == "on_arrival":
            # The earlier parts were acked already and will not come again: keep them so
            # that the SMSC's resend of this last part completes the message.
            self._parts.restore(complete)

    async def _accept(
        self,
        sm: ShortMessage,
        device: str,
        data_coding: int,
        texts: list[tuple[int, bytes]],
        holders: tuple[Held, ...],
        *,
        concat_key: str,
        parts: int = 1,
    ) -> int:
        octets = b"".join(o for _, o in texts)
        # One coding keeps the id it had before parts could differ (resends still match).
        distinct = list(dict.fromkeys(str(dc) for dc, _ in texts))
        codings = ",".join(distinct) if len(distinct) > 1 else str(data_coding)
        msg_id = self._msg_id(device, sm.destination_addr, codings, concat_key, octets)
        log = self._log.bind(msg_id=msg_id, device=device, parts=parts)
        status: int
        try:
            text = codec.decode_parts(texts)
        except codec.CodingError as exc:
            status = await self._reject(
                log,
                Status.RX_P_APPN,
                Rejection(
                    device=device,
                    reason="bad_coding",
                    detail=str(exc),
                    content=octets,
                    msg_id=msg_id,
                ),
            )
        else:
            status = await self._store(log, device, text, msg_id)
        await asyncio.gather(*(h.answer(status) for h in holders))
        return status

    async def _reject(self, log: Logger, status: int, rejection: Rejection) -> int:
        """Keep input refused for good in the dead-letter queue; the status to answer:
        ``status`` once kept, else one that withholds the acknowledgement (even the
        record found no room, so the SMSC resends)."""
        try:
            await self._context.reject(rejection)
        except IntakeRefusedError as exc:
            return self._refused(log, exc)
        # The core logged it (intake.rejected): the refusal's one line. Ours is debug.
        log.debug("smpp.mo.refused", reason=rejection.reason, status=status_name(status))
        return status

    def _refused(self, log: Logger, exc: IntakeRefusedError) -> int:
        """The status for an intake refusal, logged as the refusal's one line unless the
        core already logged it (a permanent refusal: intake.rejected)."""
        status = refusal_status(exc)
        event = "smpp.mo.refused"
        emit = log.debug if exc.permanent else log.warning
        emit(
            event,
            reason=exc.reason,
            detail=exc.detail,
            retry_after=exc.retry_after,
            status=status_name(status),
        )
        return status

    async def _store(self, log: Logger, device: str, text: str, msg_id: str | None) -> int:
        try:
            acceptance = await self._context.accept(
                Uplink(device=device, payload=text, msg_id=msg_id)
            )
        except IntakeRefusedError as exc:
            return self._refused(log, exc)
        except Exception as exc:
            # The store failed in a way a later attempt may not: let the SMSC retry.
            log.exception(
                "smpp.mo.refused",
                reason="intake failed",
                error=repr(exc),
                status=status_name(Status.RX_T_APPN),
            )
            return Status.RX_T_APPN
        log.info("smpp.mo.accepted", msg_id=acceptance.msg_id, duplicate=acceptance.duplicate)
        return Status.ROK

    def _msg_id(
        self, device: str, dest: str, data_coding: str, concat_key: str, octets: bytes
    ) -> str | None:
        """A stable id, so that an SMSC resend of a message we stored is stored once.

        SMPP 3.4 gives an MO message no id of its own, and a resend is a new PDU with a
        new sequence number. The id is therefore a digest of what a resend repeats (the
        addresses, coding, concatenation reference and the text) and of the
        ``mo_dedup_window`` time slot it arrived in: the same text from the same device
        within one slot is taken as a resend. ``mo_dedup_window = 0`` turns this off (every
        deliver_sm is a new message; a resend is then stored again).
        """
        window = self._config.mo_dedup_window
        if window <= 0:
            return None
        slot = int(time.time() // window)
        digest = hashlib.sha256(
            "\x1f".join((device, dest, data_coding, concat_key, str(slot))).encode()
            + b"\x1f"
            + octets
        ).hexdigest()
        return f"sms-{digest[:32]}"

    async def expire_parts(self) -> None:
        """Answer the parts of messages that never completed, so the SMSC retries them."""
        for key, holders in self._parts.expired():
            self._log.warning(
                "smpp.mo.parts_expired", device=key[0], ref=key[2], total=key[3], held=len(holders)
            )
            await asyncio.gather(*(h.answer(Status.RX_T_APPN) for h in holders))


def _sar(sm: ShortMessage) -> codec.Concat | None:
    ref = sm.tlv_int(Tag.SAR_MSG_REF_NUM)
    total = sm.tlv_int(Tag.SAR_TOTAL_SEGMENTS)
    seq = sm.tlv_int(Tag.SAR_SEGMENT_SEQNUM)
    if ref is None or total is None or seq is None:
        return None
    return codec.Concat(ref=ref, total=total, seq=seq, wide_ref=True)
