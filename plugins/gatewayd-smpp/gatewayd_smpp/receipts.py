"""SMSC delivery receipts: reading them, and matching them to the submits that wait.

A receipt names the SMSC's message id (TLV ``receipted_message_id``, else the ``id:``
field of the text of SMPP 3.4 Appendix B) and a state (TLV ``message_state``, else
``stat:``). It may overtake the task that waits for it (the submit_sm_resp and the
receipt can be read back to back), so a receipt nobody waits for yet is kept a while.
"""

from __future__ import annotations

import asyncio
import re
import string
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

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


def id_keys(message_id: str, id_format: str) -> tuple[str, ...]:
    """The keys an SMSC message id is matched under, most specific first.

    SMSCs disagree with themselves: one answers submit_sm_resp with ``"1234"`` and
    writes ``id:4d2`` (the same number in hex) or ``id:0000001234`` in the receipt.
    So ids are compared as numbers when they read as numbers: ``"decimal"`` and
    ``"hex"`` say how (Kannel's ``msg-id-type``), ``"string"`` compares them exactly
    (case and leading zeros aside), and ``"auto"`` tries the string, then decimal,
    then hex, so that a receipt in either base finds its submit.
    """
    text = message_id.strip()
    keys = ["s:" + (text.lower().lstrip("0") or "0")]
    if id_format == "string":
        return (keys[0],)
    if id_format in ("auto", "decimal") and text.isdigit() and text.isascii():
        keys.append(f"n:{int(text, 10)}")
    if id_format in ("auto", "hex") and text and set(text) <= _HEX:
        keys.append(f"n:{int(text, 16)}")
    if id_format != "auto":
        return tuple(keys[1:]) or (keys[0],)
    return tuple(dict.fromkeys(keys))


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


class ReceiptBook:
    """Futures for the receipts submits are waiting for, keyed by SMSC message id.

    ``submit_format`` and ``receipt_format`` say how the ids of each side are read
    (:func:`id_keys`). A receipt nobody waits for is kept (the last ``keep`` of them)
    for a submit whose task it overtook.
    """

    def __init__(
        self, keep: int = 10000, *, submit_format: str = "auto", receipt_format: str = "auto"
    ) -> None:
        self._waiting: dict[str, asyncio.Future[Receipt]] = {}
        self._keys_of: dict[asyncio.Future[Receipt], tuple[str, ...]] = {}
        self._early: OrderedDict[str, Receipt] = OrderedDict()
        self._keep = keep
        self.submit_format = submit_format
        self.receipt_format = receipt_format

    def submit_keys(self, message_id: str) -> tuple[str, ...]:
        return id_keys(message_id, self.submit_format)

    def receipt_keys(self, message_id: str) -> tuple[str, ...]:
        return id_keys(message_id, self.receipt_format)

    def expect(self, message_id: str) -> asyncio.Future[Receipt]:
        future: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        keys = self.submit_keys(message_id)
        for key in keys:
            early = self._early.pop(key, None)
            if early is not None:
                future.set_result(early)
                return future
        for key in keys:
            self._waiting.setdefault(key, future)
        self._keys_of[future] = keys
        return future

    def resolve(self, receipt: Receipt) -> bool:
        """Hand a final receipt to its waiter; ``False`` when nobody waits (kept a while)."""
        keys = self.receipt_keys(receipt.message_id)
        for key in keys:
            future = self._waiting.get(key)
            if future is not None and not future.done():
                future.set_result(receipt)
                self._drop(future)
                return True
        for key in keys:
            self._early[key] = receipt
        while len(self._early) > self._keep:
            self._early.popitem(last=False)
        return False

    def _drop(self, future: asyncio.Future[Receipt]) -> None:
        for key in self._keys_of.pop(future, ()):
            if self._waiting.get(key) is future:
                del self._waiting[key]

    def forget(self, message_ids: Iterable[str]) -> None:
        for message_id in message_ids:
            for key in self.submit_keys(message_id):
                future = self._waiting.pop(key, None)
                if future is not None:
                    future.cancel()
                    self._drop(future)
