"""SMSC delivery receipts: reading them, and matching them to the submits that wait.

A receipt names the SMSC's message id (TLV ``receipted_message_id``, else the ``id:``
field of the text of SMPP 3.4 Appendix B) and a state (TLV ``message_state``, else
``stat:``). It may overtake the task that waits for it (the submit_sm_resp and the
receipt can be read back to back), so a receipt nobody waits for yet is kept a while.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
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
    """Futures for the receipts submits are waiting for, keyed by SMSC message id."""

    def __init__(self, keep: int = 10000) -> None:
        self._waiting: dict[str, asyncio.Future[Receipt]] = {}
        self._early: OrderedDict[str, Receipt] = OrderedDict()
        self._keep = keep

    def expect(self, message_id: str) -> asyncio.Future[Receipt]:
        future: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        early = self._early.pop(message_id, None)
        if early is not None:
            future.set_result(early)
        else:
            self._waiting[message_id] = future
        return future

    def resolve(self, receipt: Receipt) -> bool:
        """Hand a final receipt to its waiter; ``False`` when nobody waits (kept a while)."""
        future = self._waiting.pop(receipt.message_id, None)
        if future is not None and not future.done():
            future.set_result(receipt)
            return True
        self._early[receipt.message_id] = receipt
        while len(self._early) > self._keep:
            self._early.popitem(last=False)
        return False

    def forget(self, message_ids: list[str]) -> None:
        for message_id in message_ids:
            future = self._waiting.pop(message_id, None)
            if future is not None:
                future.cancel()
