"""SMSC delivery receipts: reading them, and matching them to the submits that wait.

A receipt names the SMSC's message id (TLV ``receipted_message_id``, else the ``id:``
field of the text of SMPP 3.4 Appendix B) and a state (TLV ``message_state``, else
``stat:``). It may overtake the task that waits for it (the submit_sm_resp and the
receipt can be read back to back), so a receipt nobody waits for yet is kept a while.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import re
import string
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from gatewayd.api import Logger
from gatewayd_smpp.pdu import ShortMessage, Tag

DELIVERED = 2
# message_state values (SMPP 3.4 section 5.3.2.35) and the stat: words of Appendix B.
STATES = {
    1: "ENROUTE",
    2: "DELIVRD",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIV",
    6: "ACCEPTD",
    7: "UNKNOWN",
    8: "REJECTD",
}
_BY_WORD = {word: state for state, word in STATES.items()}
# ENROUTE and ACCEPTD are not final: the message may still be delivered.
NOT_FINAL = frozenset({1, 6})

ID_FORMATS = ("auto", "string", "decimal", "hex")
_HEX = frozenset(string.hexdigits)


def declared_key(message_id: str, id_format: str) -> str:
    """The key of an SMSC message id on a side whose format is declared.

    SMSCs disagree with themselves: one answers submit_sm_resp with ``"1234"`` and
    writes ``id:4d2`` (the same number in hex) or ``id:0000001234`` in the receipt.
    So ids are compared as numbers when they read as numbers: ``"decimal"`` and
    ``"hex"`` say how (Kannel's ``msg-id-type``); ``"string"``, and an id that does not
    read in the declared base, compares the text (case and leading zeros aside).
    ``"auto"`` is no format of one id but a choice among readings (:class:`Reading`).
    """
    text = message_id.strip()
    if id_format == "decimal" and text.isdigit() and text.isascii():
        return f"n:{int(text, 10)}"
    if id_format == "hex" and text and set(text) <= _HEX:
        return f"n:{int(text, 16)}"
    return "s:" + (text.lower().lstrip("0") or "0")


class Match(enum.Enum):
    """What :meth:`ReceiptBook.resolve` did with a receipt."""

    MATCHED = "matched"  # handed to the one submit it names
    AMBIGUOUS = "ambiguous"  # it could name several submits: kept, nobody guessed
    UNCLAIMED = "unclaimed"  # it names no submit waiting here: kept a while


@dataclass(frozen=True, slots=True)
class Reading:
    """One way a submit_sm_resp id and a receipt id name the same message: how each
    side reads (``"string"``, ``"decimal"``, ``"hex"``), and the tag of its keys."""

    submit: str
    receipt: str
    tag: str  # "" for two declared formats: the keys of :func:`declared_key`

    def submit_key(self, message_id: str) -> str | None:
        return self._key(message_id, self.submit)

    def receipt_key(self, message_id: str) -> str | None:
        return self._key(message_id, self.receipt)

    def _key(self, message_id: str, id_format: str) -> str | None:
        if not self.tag:
            return declared_key(message_id, id_format)
        value = _read(message_id.strip(), id_format)
        return None if value is None else f"{self.tag}:{value}"


# With "auto", the readings tried: the same text (which also covers both sides in one
# base: "0010" and "10" are the same number in either), or one side in each base.
# Their keys are tagged apart, so that "10" read one way never meets "10" read another.
SAME = Reading("string", "string", "s")
DEC_HEX = Reading("decimal", "hex", "dh")
HEX_DEC = Reading("hex", "decimal", "hd")


def readings(submit_format: str, receipt_format: str) -> tuple[Reading, ...]:
    """The readings the two formats allow; one (the declared pair) without "auto"."""
    if "auto" not in (submit_format, receipt_format):
        return (Reading(submit_format, receipt_format, ""),)
    crossed = [
        r
        for r in (DEC_HEX, HEX_DEC)
        if submit_format in ("auto", r.submit) and receipt_format in ("auto", r.receipt)
    ]
    return (SAME, *crossed)


def _read(text: str, id_format: str) -> str | None:
    if id_format == "string":
        return text.lower().lstrip("0") or "0"
    if id_format == "decimal":
        return str(int(text, 10)) if text.isascii() and text.isdigit() else None
    return str(int(text, 16)) if text and set(text) <= _HEX else None


_ID = re.compile(r"\bid:(\S+)", re.IGNORECASE)
_STAT = re.compile(r"\bstat:(\w+)", re.IGNORECASE)
_ERR = re.compile(r"\berr:(\w+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What an SMSC says became of one submitted short message."""

    message_id: str
    state: int
    error: str | None = None

    @property
    def stat(self) -> str:
        return STATES.get(self.state, f"STATE_{self.state}")

    @property
    def delivered(self) -> bool:
        return self.state == DELIVERED

    @property
    def final(self) -> bool:
        return self.state not in NOT_FINAL


def parse(sm: ShortMessage) -> Receipt | None:
    """The receipt in a deliver_sm flagged as one; ``None`` when it names no message."""
    text = sm.short_message.decode("latin-1")
    message_id = sm.tlv_cstring(Tag.RECEIPTED_MESSAGE_ID)
    if not message_id:
        found = _ID.search(text)
        message_id = found.group(1) if found else None
    if not message_id:
        return None
    state = sm.tlv_int(Tag.MESSAGE_STATE)
    if state is None:
        found = _STAT.search(text)
        state = _BY_WORD.get(found.group(1).upper(), 7) if found else 7
    err = _ERR.search(text)
    return Receipt(message_id=message_id, state=state, error=err.group(1) if err else None)


@dataclass(slots=True)
class _Pending:
    message_id: str
    keys: dict[Reading, str]


@dataclass(slots=True)
class _Kept:
    receipt: Receipt
    keys: dict[Reading, str]


class ReceiptBook:
    """Futures for the receipts submits are waiting for, keyed by SMSC message id.

    ``submit_format`` and ``receipt_format`` say how the ids of each side are read
    (:func:`readings`). A receipt nobody waits for is kept (the last ``keep`` of them)
    for a submit whose task it overtook.

    With ``"auto"`` on either side a receipt may name several waiting submits ("10" is
    ten, or sixteen in hex). Such a receipt is matched to none: it is kept and logged
    (``smpp.receipt.ambiguous``), and its submits keep waiting. A receipt that names
    exactly one submit is matched, and teaches the book which readings the SMSC uses:
    those that linked the two ids. Once one reading is left it is logged
    (``smpp.receipt.format_learned``) and is the only one used from then on; the kept
    receipts are tried again under it. The same rule holds when the submit comes
    second (a receipt that overtook its submit's task).
    """

    def __init__(
        self,
        keep: int = 10000,
        *,
        submit_format: str = "auto",
        receipt_format: str = "auto",
        log: Logger | None = None,
        transport: str = "",
    ) -> None:
        self.submit_format = submit_format
        self.receipt_format = receipt_format
        self._all = readings(submit_format, receipt_format)
        self._readings = self._all
        self._waiting: dict[Reading, dict[str, asyncio.Future[Receipt]]] = {
            r: {} for r in self._all
        }
        self._pending: dict[asyncio.Future[Receipt], _Pending] = {}
        self._kept: OrderedDict[int, _Kept] = OrderedDict()
        self._kept_at: dict[Reading, dict[str, int]] = {r: {} for r in self._all}
        self._serials = itertools.count()
        self._keep = keep
        self._log: Logger = log if log is not None else structlog.get_logger("gatewayd_smpp")
        self._transport = transport

    @property
    def learned(self) -> Reading | None:
        """The one reading an "auto" book settled on, once it has."""
        if len(self._all) > 1 and len(self._readings) == 1:
            return self._readings[0]
        return None

    def submit_keys(self, message_id: str) -> tuple[str, ...]:
        """Every key a submit id may be found under (all readings the formats allow):
        what the durable table is written with, learned reading or not."""
        return tuple(self._keys(message_id, self._all, True).values())

    def receipt_keys(self, message_id: str) -> tuple[str, ...]:
        """The keys a receipt id is looked up under: the readings still in use."""
        return tuple(self._keys(message_id, self._readings, False).values())

    @staticmethod
    def _keys(message_id: str, using: tuple[Reading, ...], submit: bool) -> dict[Reading, str]:
        keys: dict[Reading, str] = {}
        for reading in using:
            key = reading.submit_key(message_id) if submit else reading.receipt_key(message_id)
            if key is not None:
                keys[reading] = key
        return keys

    # --- submits ----------------------------------------------------------------------

    def expect(self, message_id: str) -> asyncio.Future[Receipt]:
        """A future for the receipt of ``message_id``; done at once when a receipt that
        overtook it names it, and nothing else that waits."""
        future: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        keys = self._keys(message_id, self._readings, True)
        found: dict[int, set[Reading]] = {}
        for reading, key in keys.items():
            serial = self._kept_at[reading].get(key)
            if serial is not None:
                found.setdefault(serial, set()).add(reading)
        if len(found) == 1:
            ((serial, how),) = found.items()
            kept = self._kept[serial]
            others = self._hits(kept.keys)
            if not others:
                self._unkeep(serial)
                future.set_result(kept.receipt)
                self._learn(how)
                return future
            named = [self._pending[f].message_id for f in others]
            self.ambiguous([kept.receipt.message_id], [*named, message_id])
        elif found:
            self.ambiguous([self._kept[s].receipt.message_id for s in found], [message_id])
        for reading, key in keys.items():
            self._waiting[reading].setdefault(key, future)
        self._pending[future] = _Pending(message_id, keys)
        return future

    def forget(self, message_ids: Iterable[str]) -> None:
        """Stop waiting for these submits' receipts (their futures are cancelled)."""
        for message_id in message_ids:
            for reading, key in self._keys(message_id, self._readings, True).items():
                future = self._waiting[reading].get(key)
                if future is not None:
                    future.cancel()
                    self._drop(future)

    # --- receipts ---------------------------------------------------------------------

    def resolve(self, receipt: Receipt) -> Match:
        """Hand a final receipt to the one submit it names. Otherwise keep it a while:
        a submit may still come for it, or a learned reading may settle it."""
        keys = self._keys(receipt.message_id, self._readings, False)
        hits = self._hits(keys)
        if len(hits) == 1:
            ((future, how),) = hits.items()
            self._settle(future, receipt, how)
            return Match.MATCHED
        self._store(receipt, keys)
        if hits:
            self.ambiguous([receipt.message_id], [self._pending[f].message_id for f in hits])
            return Match.AMBIGUOUS
        return Match.UNCLAIMED

    def is_kept(self, receipt: Receipt) -> bool:
        """Whether ``receipt`` (as :meth:`resolve` kept it) still waits for a submit."""
        for reading, key in self._keys(receipt.message_id, self._readings, False).items():
            serial = self._kept_at[reading].get(key)
            if serial is not None and self._kept[serial].receipt is receipt:
                return True
        return False

    def learn(self, message_id: str, matched: Iterable[str]) -> None:
        """A receipt matched elsewhere (in the durable table) under the keys
        ``matched`` (of :meth:`receipt_keys`): learn from it as from one matched here."""
        wanted = set(matched)
        keys = self._keys(message_id, self._readings, False)
        self._learn({r for r, k in keys.items() if k in wanted})

    def _hits(self, keys: dict[Reading, str]) -> dict[asyncio.Future[Receipt], set[Reading]]:
        """The waiting submits a receipt's keys reach, each with the readings that do."""
        hits: dict[asyncio.Future[Receipt], set[Reading]] = {}
        for reading, key in keys.items():
            future = self._waiting[reading].get(key)
            if future is not None and not future.done():
                hits.setdefault(future, set()).add(reading)
        return hits

    def _settle(self, future: asyncio.Future[Receipt], receipt: Receipt, how: set[Reading]) -> None:
        future.set_result(receipt)
        self._drop(future)
        self._learn(how)

    def _drop(self, future: asyncio.Future[Receipt]) -> None:
        pending = self._pending.pop(future, None)
        if pending is None:
            return
        for reading, key in pending.keys.items():
            index = self._waiting[reading]
            if index.get(key) is future:
                del index[key]

    def _store(self, receipt: Receipt, keys: dict[Reading, str]) -> None:
        serial = next(self._serials)
        self._kept[serial] = _Kept(receipt, keys)
        for reading, key in keys.items():
            self._kept_at[reading][key] = serial
        while len(self._kept) > self._keep:
            self._unkeep(next(iter(self._kept)))

    def _unkeep(self, serial: int) -> None:
        kept = self._kept.pop(serial)
        for reading, key in kept.keys.items():
            index = self._kept_at[reading]
            if index.get(key) == serial:
                del index[key]

    # --- learning the SMSC's formats --------------------------------------------------

    def _learn(self, how: set[Reading]) -> None:
        """Keep only the readings that linked an unambiguous match."""
        narrowed = tuple(r for r in self._readings if r in how)
        if len(self._readings) == 1 or narrowed == self._readings or not narrowed:
            return
        for dropped in self._readings:
            if dropped not in narrowed:
                self._waiting[dropped].clear()
                self._kept_at[dropped].clear()
        self._readings = narrowed
        if len(narrowed) == 1:
            self._log.info(
                "smpp.receipt.format_learned",
                transport=self._transport,
                submit_id_format=narrowed[0].submit,
                receipt_id_format=narrowed[0].receipt,
            )
        # Receipts kept as ambiguous may name one submit under fewer readings.
        for serial in list(self._kept):
            kept = self._kept.get(serial)
            if kept is None:
                continue
            kept.keys = {r: k for r, k in kept.keys.items() if r in narrowed}
            hits = self._hits(kept.keys)
            if len(hits) == 1:
                ((future, _),) = hits.items()
                self._unkeep(serial)
                future.set_result(kept.receipt)
                self._drop(future)

    def ambiguous(self, receipt_ids: list[str], candidates: list[str]) -> None:
        """Say that these receipts could name any of ``candidates``: none is guessed."""
        self._log.warning(
            "smpp.receipt.ambiguous",
            transport=self._transport,
            receipt_ids=receipt_ids,
            candidates=candidates,
        )
