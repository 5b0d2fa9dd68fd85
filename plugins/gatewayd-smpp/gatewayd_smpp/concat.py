"""Reassembly of multi-part MO messages, in memory, with a timeout.

Parts are keyed by (source, destination, reference, total, reference width) so two
devices, or one device using both reference widths, never mix. A part that arrives
twice (an SMSC resend) replaces the earlier copy; its older holder is returned to the
caller, which still owes it a response. Each part keeps its own data_coding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gatewayd_smpp.codec import Concat

H = TypeVar("H")  # what the caller keeps per part (the pending deliver_sm, to ack later)

Key = tuple[str, str, int, int, bool]


@dataclass(slots=True)
class _Pending(Generic[H]):
    started: float
    parts: dict[int, tuple[int, bytes, H]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Complete(Generic[H]):
    """Every part is here: ``parts`` is (seq, data_coding, text octets, holder) in order."""

    key: Key
    parts: tuple[tuple[int, int, bytes, H], ...]

    @property
    def data_coding(self) -> int:
        return self.parts[0][1]

    @property
    def octets(self) -> bytes:
        return b"".join(octets for _, _, octets, _ in self.parts)

    @property
    def texts(self) -> list[tuple[int, bytes]]:
        """(data_coding, octets) per part, for decoding each with its own coding."""
        return [(dc, octets) for _, dc, octets, _ in self.parts]

    @property
    def holders(self) -> tuple[H, ...]:
        return tuple(holder for _, _, _, holder in self.parts)


class Reassembler(Generic[H]):
    """Collects parts until a message is complete or its time runs out."""

    def __init__(self, timeout: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout = timeout
        self._clock = clock
        self._pending: dict[Key, _Pending[H]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(
        self,
        *,
        source: str,
        dest: str,
        concat: Concat,
        data_coding: int,
        octets: bytes,
        holder: H,
    ) -> tuple[Complete[H] | None, H | None]:
        """Add one part. Returns (the complete message or None, a replaced holder or None)."""
        key: Key = (source, dest, concat.ref, concat.total, concat.wide_ref)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(self._clock())
        replaced = pending.parts.get(concat.seq)
        pending.parts[concat.seq] = (data_coding, octets, holder)
        old = replaced[2] if replaced else None
        if len(pending.parts) < concat.total:
            return None, old
        del self._pending[key]
        parts = tuple((seq, *pending.parts[seq]) for seq in sorted(pending.parts))
        return Complete(key=key, parts=parts), old

    def restore(self, complete: Complete[H]) -> None:
        """Put a refused message's parts back, with their age reset.

        Used when earlier parts were already acknowledged on arrival: the SMSC resends
        only the refused part, which then replaces its copy and completes the message.
        """
        pending = _Pending[H](self._clock())
        for seq, data_coding, octets, holder in complete.parts:
            pending.parts[seq] = (data_coding, octets, holder)
        self._pending[complete.key] = pending

    def expired(self) -> list[tuple[Key, list[H]]]:
        """Drop and return the messages whose first part is older than the timeout."""
        limit = self._clock() - self._timeout
        gone = [k for k, p in self._pending.items() if p.started <= limit]
        return [(k, [h for _, _, h in self._pending.pop(k).parts.values()]) for k in gone]

    def clear(self) -> list[H]:
        """Drop everything (the session ended); return the holders to release."""
        holders = [h for p in self._pending.values() for _, _, h in p.parts.values()]
        self._pending.clear()
        return holders
