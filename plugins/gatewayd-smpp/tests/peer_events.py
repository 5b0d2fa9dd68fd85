"""What both test SMSCs share: a list of events, one dict each, and ways to wait for them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


class EventLog:
    """``events`` in arrival order; :meth:`wait_for` and :meth:`next` wait for more."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()

    async def add(self, event: Event) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["event"] == kind]

    async def wait_for(
        self, match: Callable[[Event], bool], *, count: int = 1, timeout: float = 10.0
    ) -> list[Event]:
        """The first ``count`` events matching; waits for them to arrive."""

        def found() -> list[Event]:
            return [e for e in self.events if match(e)]

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(found()) >= count)
        return found()[:count]

    async def next(self, kind: str, *, after: int = 0, timeout: float = 10.0) -> Event:
        """The first event of ``kind`` beyond the first ``after`` of that kind."""
        events = await self.wait_for(lambda e: e["event"] == kind, count=after + 1, timeout=timeout)
        return events[after]
