"""Failure injection: make the MSGS endpoints answer 503/429 with Retry-After for a while,
so gateway tests can exercise their backoff and store-and-forward paths."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """Answer ``status`` with ``Retry-After: retry_after`` (seconds)."""

    status: int = 503
    retry_after: int = 1


class Faults:
    """The active fault, for the next ``count`` requests or until a deadline."""

    def __init__(self) -> None:
        self._fault: Fault | None = None
        self._remaining: int | None = None
        self._until: float | None = None

    def set(self, fault: Fault, *, count: int | None = None, seconds: float | None = None) -> None:
        if (count is None) == (seconds is None):
            raise ValueError("give exactly one of count and seconds")
        self._fault = fault
        self._remaining = count
        self._until = None if seconds is None else time.monotonic() + seconds

    def clear(self) -> None:
        self._fault = None

    def take(self) -> Fault | None:
        """The fault to apply to this request, if any; consumes one of ``count``."""
        fault = self._fault
        if fault is None:
            return None
        if self._until is not None and time.monotonic() >= self._until:
            self._fault = None
            return None
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining <= 0:
                self._fault = None
        return fault
