"""Acknowledgements in arrival order, each sent only once its message is stored.

MQTT 3.1.1 4.6 and MQTT 5 4.6 ask a receiver to send PUBACKs in the order the
PUBLISHes arrived. Messages are stored concurrently (and finish in any order), so each
one's acknowledgement waits here until every earlier one is settled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gatewayd_mqtt.client import ManualAck


@dataclass(slots=True)
class Pending:
    """One received QoS > 0 message, until it is settled (acked, or left to the broker)."""

    mid: int
    qos: int
    settled: bool = False
    ack: bool = False
    reason: int = 0  # an MQTT 5 PUBACK reason code: >= 0x80 refuses the message for good


class AckQueue:
    """Arrival-ordered acknowledgements for one connection."""

    def __init__(self, acks: ManualAck) -> None:
        self._acks = acks
        self._queue: deque[Pending] = deque()
        self.sent = 0

    def track(self, mid: int, qos: int) -> Pending:
        """Register a message as it arrives, before any work on it starts."""
        entry = Pending(mid, qos)
        self._queue.append(entry)
        return entry

    def settle(self, entry: Pending, *, ack: bool, reason: int = 0) -> int:
        """``ack=False`` leaves the message unacknowledged: the broker redelivers it on
        the next connection of this session. Later messages are not held up by it.

        Returns how many messages left the queue (acknowledged or left with the
        broker): none while an earlier one is still unsettled."""
        entry.settled, entry.ack, entry.reason = True, ack, reason
        released = 0
        while self._queue and self._queue[0].settled:
            head = self._queue.popleft()
            released += 1
            if head.ack and self._acks.ack(head.mid, head.qos, head.reason):
                self.sent += 1
        return released

    def __len__(self) -> int:
        return len(self._queue)
