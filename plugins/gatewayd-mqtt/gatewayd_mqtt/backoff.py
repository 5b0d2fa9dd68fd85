"""Jittered exponential backoff for reconnects and intake retries."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """``initial * 2**attempt`` capped at ``maximum``, drawn from [50 %, 100 %] of that.

    The jitter keeps a fleet of gateways that lost the same broker from reconnecting in
    lock-step; the 50 % floor keeps the delay from collapsing to zero.
    """

    initial: float
    maximum: float

    def delay(self, attempt: int) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(attempt, 30))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security
