"""A strict SMSC on ``smpp.pdu3`` (the PDU codec Jasmin uses), as a second, independent peer.

npm ``smpp`` is lenient: it took our 16-octet deliver_sm_resp. This peer decodes and
encodes every PDU with smpp.pdu3 and behaves as strict SMSCs do: a PDU it cannot decode
gets a generic_nack and the session is dropped (as smpp.twisted3 does). It runs in the
test's event loop over real loopback TCP.

Knobs (attributes a test sets): ``id_format`` of the submit_sm_resp ids ("decimal",
"hex"), ``receipt_id_format`` of the ids in receipt texts, ``auto_receipt`` (a stat word
or ``None``), ``receipt_tlvs`` (also send receipted_message_id/message_state),
``submit_statuses`` (statuses to answer the next submits with, consumed in order),
``submit_ids`` (the numbers the next accepted submits get, consumed in order; else
they count up from 1000),
``bind_status``, ``drop_after_bind`` (close right after a successful bind: a flapping
SMSC) and ``answer_bind_with_nack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from peer_events import EventLog
from smpp.pdu import operations as op  # type: ignore[import-untyped]
from smpp.pdu import pdu_encoding as pe
from smpp.pdu import pdu_types as pt
from smpp.pdu.error import PDUCorruptError, PDUParseError  # type: ignore[import-untyped]


def _codec() -> Any:
    # A fresh codec per PDU: smpp.pdu3's TLV encoders keep the length of the last
    # variable-size value they decoded (a 400-octet message_payload then refused an
    # 18-octet one).
    return pe.PDUEncoder()


_STATUS = {s.name: s for s in pt.CommandStatus}


def status(name: str) -> Any:
    """smpp.pdu3's CommandStatus for ``ESME_RTHROTTLED`` and the like."""
    return _STATUS[name]


def raw_int(encoder: Any, value: Any) -> int:
    return int.from_bytes(encoder.encode(value), "big")


@dataclass
class Conn:
    """One ESME connection: its bind type and a writer."""

    writer: asyncio.StreamWriter
    number: int = 0
    bind: str = ""
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)


class StrictSmsc(EventLog):
    """The server; ``events`` records what happened, one dict per event."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.id_format = "decimal"
        self.receipt_id_format = "hex"
        self.auto_receipt: str | None = None
        self.receipt_tlvs = False
        self.submit_statuses: list[str] = []
        self.submit_ids: list[int] = []
        self.bind_status = "ESME_ROK"
        self.drop_after_bind = False
        self.answer_bind_with_nack = False
        self.conns: list[Conn] = []
        self._ids = itertools.count(1000)
        self._seq = itertools.count(1)
        self._conn_numbers = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.conns:
            conn.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _record(self, name: str, /, **fields: Any) -> None:
        await self.add({"event": name, "at": time.monotonic(), **fields})

    # --- the connection -------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(writer, next(self._conn_numbers))
        self.conns.append(conn)
        try:
            while True:
                head = await reader.readexactly(4)
                (length,) = struct.unpack(">I", head)
                raw = head + await reader.readexactly(max(length - 4, 0))
                try:
                    pdu = _codec().decode(io.BytesIO(raw))
                except (PDUCorruptError, PDUParseError) as exc:
                    # What strict SMSCs do: say so, then drop the session.
                    await self._record("corrupt", error=str(exc), raw=raw.hex(), bind=conn.bind)
                    seq = struct.unpack(">I", raw[12:16])[0] if len(raw) >= 16 else 0
                    nack = op.GenericNack(seqNum=seq, status=exc.status)
                    await self._send(conn, nack)
                    return
                await self._dispatch(conn, pdu, raw)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self._record("closed", bind=conn.bind)
        finally:
            writer.close()
            if conn in self.conns:
                self.conns.remove(conn)

    async def _send(self, conn: Conn, pdu: Any) -> None:
        conn.writer.write(_codec().encode(pdu))
        with contextlib.suppress(ConnectionError):
            await conn.writer.drain()

    async def _dispatch(self, conn: Conn, pdu: Any, raw: bytes) -> None:
        name = pdu.commandId.name
        if name.startswith("bind_"):
            await self._bind(conn, pdu, name)
        elif name == "submit_sm":
            await self._submit(conn, pdu)
        elif name == "enquire_link":
            await self._record("enquire_link", bind=conn.bind)
            await self._send(conn, op.EnquireLinkResp(seqNum=pdu.seqNum))
        elif name == "unbind":
            await self._record("unbind", bind=conn.bind)
            await self._send(conn, op.UnbindResp(seqNum=pdu.seqNum))
            conn.writer.close()
        elif name in ("deliver_sm_resp", "data_sm_resp", "generic_nack"):
            await self._record(
                name, status=pdu.status.name, length=len(raw), seq=pdu.seqNum, bind=conn.bind
            )
            future = conn.pending.pop(pdu.seqNum, None)
            if future is not None and not future.done():
                future.set_result(pdu)
        else:
            await self._record("unexpected", command=name)

    async def _bind(self, conn: Conn, pdu: Any, name: str) -> None:
        kind = name.removeprefix("bind_")
        await self._record(
            "bind",
            kind=kind,
            system_id=pdu.params["system_id"].decode(),
            password=pdu.params["password"].decode(),
        )
        resp_cls = {
            "transceiver": op.BindTransceiverResp,
            "transmitter": op.BindTransmitterResp,
            "receiver": op.BindReceiverResp,
        }[kind]
        if self.answer_bind_with_nack:
            await self._send(conn, op.GenericNack(seqNum=pdu.seqNum, status=status("ESME_ROK")))
            return
        if self.bind_status != "ESME_ROK":
            await self._send(conn, resp_cls(seqNum=pdu.seqNum, status=status(self.bind_status)))
            return
        conn.bind = kind
        await self._send(conn, resp_cls(seqNum=pdu.seqNum, system_id=b"strict"))
        if self.drop_after_bind:
            conn.writer.close()

    async def _submit(self, conn: Conn, pdu: Any) -> None:
        params = pdu.params
        number = self.submit_ids.pop(0) if self.submit_ids else next(self._ids)
        smsc_id = str(number) if self.id_format == "decimal" else f"{number:x}"
        event = {
            "destination_addr": params["destination_addr"].decode(),
            "source_addr": params["source_addr"].decode(),
            "data_coding": raw_int(pe.DataCodingEncoder(), params["data_coding"]),
            "esm_class": raw_int(pe.EsmClassEncoder(), params["esm_class"]),
            "registered_delivery": raw_int(
                pe.RegisteredDeliveryEncoder(), params["registered_delivery"]
            ),
            "short_message": (params.get("short_message") or b"").hex(),
            "message_payload": (params.get("message_payload") or b"").hex(),
            "bind": conn.bind,
            "conn": conn.number,
        }
        if self.submit_statuses:
            refused = self.submit_statuses.pop(0)
            await self._record("submit_sm", status=refused, **event)
            await self._send(conn, op.SubmitSMResp(seqNum=pdu.seqNum, status=status(refused)))
            return
        await self._record("submit_sm", status="ESME_ROK", message_id=smsc_id, **event)
        await self._send(conn, op.SubmitSMResp(seqNum=pdu.seqNum, message_id=smsc_id))
        if self.auto_receipt is not None and event["registered_delivery"] & 1:
            await self.receipt(number, self.auto_receipt, dest=event["destination_addr"])

    # --- what a test makes the SMSC send ----------------------------------------------

    def receiver(self) -> Conn:
        for conn in self.conns:
            if conn.bind in ("transceiver", "receiver"):
                return conn
        raise AssertionError("no ESME is bound to receive")

    async def receipt(self, number: int, stat: str, *, dest: str = "447700900001") -> None:
        """A delivery receipt for the submit that got id ``number``, in the Appendix B text."""
        shown = f"{number:x}" if self.receipt_id_format == "hex" else f"{number:010d}"
        text = (
            f"id:{shown} sub:001 dlvrd:001 submit date:2612041200 done date:2612041201"
            f" stat:{stat} err:000 text:"
        )
        extra: dict[str, Any] = {}
        if self.receipt_tlvs:
            extra["receipted_message_id"] = shown.encode()
            extra["message_state"] = pt.MessageState[stat_state(stat)]
        await self.deliver(
            source=dest,
            dest="4000",
            short_message=text.encode(),
            esm_class=pt.EsmClass(pt.EsmClassMode.DEFAULT, pt.EsmClassType.SMSC_DELIVERY_RECEIPT),
            wait=False,
            **extra,
        )

    async def deliver(
        self,
        *,
        source: str = "447700900001",
        dest: str = "4000",
        short_message: bytes = b"",
        data_coding: int = 0,
        udhi: bool = False,
        esm_class: Any = None,
        wait: bool = True,
        source_ton: Any = pt.AddrTon.INTERNATIONAL,
        **tlvs: Any,
    ) -> Any:
        """Send a deliver_sm built by smpp.pdu3; with ``wait``, return its response PDU."""
        conn = self.receiver()
        features = [pt.EsmClassGsmFeatures.UDHI_INDICATOR_SET] if udhi else []
        seq = next(self._seq)
        pdu = op.DeliverSM(
            seqNum=seq,
            service_type="",
            source_addr_ton=source_ton,
            source_addr_npi=pt.AddrNpi.ISDN,
            source_addr=source,
            dest_addr_ton=pt.AddrTon.UNKNOWN,
            dest_addr_npi=pt.AddrNpi.UNKNOWN,
            destination_addr=dest,
            esm_class=esm_class
            or pt.EsmClass(pt.EsmClassMode.DEFAULT, pt.EsmClassType.DEFAULT, features),
            protocol_id=0,
            priority_flag=pt.PriorityFlag.LEVEL_0,
            registered_delivery=pt.RegisteredDelivery(
                pt.RegisteredDeliveryReceipt.NO_SMSC_DELIVERY_RECEIPT_REQUESTED
            ),
            replace_if_present_flag=pt.ReplaceIfPresentFlag.DO_NOT_REPLACE,
            data_coding=pt.DataCoding(pt.DataCodingScheme.RAW, data_coding),
            short_message=short_message,
            **tlvs,
        )
        return await self._request(conn, pdu, wait)

    async def data_sm(self, *, source: str, payload: bytes, data_coding: int = 0) -> Any:
        """An MO message as data_sm, text in message_payload; returns the response PDU."""
        conn = self.receiver()
        pdu = op.DataSM(
            seqNum=next(self._seq),
            service_type="",
            source_addr_ton=pt.AddrTon.INTERNATIONAL,
            source_addr_npi=pt.AddrNpi.ISDN,
            source_addr=source,
            dest_addr_ton=pt.AddrTon.UNKNOWN,
            dest_addr_npi=pt.AddrNpi.UNKNOWN,
            destination_addr="4000",
            esm_class=pt.EsmClass(pt.EsmClassMode.DEFAULT, pt.EsmClassType.DEFAULT),
            registered_delivery=pt.RegisteredDelivery(
                pt.RegisteredDeliveryReceipt.NO_SMSC_DELIVERY_RECEIPT_REQUESTED
            ),
            data_coding=pt.DataCoding(pt.DataCodingScheme.RAW, data_coding),
            message_payload=payload,
        )
        return await self._request(conn, pdu, True)

    async def _request(self, conn: Conn, pdu: Any, wait: bool) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.pending[pdu.seqNum] = future
        await self._send(conn, pdu)
        if not wait:
            return None
        async with asyncio.timeout(10):
            return await future

    async def send_raw(self, data: bytes) -> None:
        """Octets that may not be a PDU at all (malformed-PDU tests)."""
        conn = self.receiver()
        conn.writer.write(data)
        await conn.writer.drain()


def stat_state(stat: str) -> str:
    return {
        "DELIVRD": "DELIVERED",
        "UNDELIV": "UNDELIVERABLE",
        "EXPIRED": "EXPIRED",
        "REJECTD": "REJECTED",
        "ENROUTE": "ENROUTE",
    }[stat]
