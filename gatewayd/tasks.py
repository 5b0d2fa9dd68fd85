"""Named, owned background tasks: the one way the core spawns work it does not await.

A bare ``asyncio.create_task`` is only weakly referenced by the loop, may die silently
and outlives whoever started it. :class:`TaskSet` keeps a strong reference until the
task ends, logs a crash with the task's name, and cancels what is left in one call.
Given a :class:`asyncio.TaskGroup`, it spawns into it, so the group's owner cannot
leave the ``async with`` while a task of the set still runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import structlog

log = structlog.get_logger(__name__)

OnCrash = Callable[[asyncio.Task[Any], BaseException], None]


class TaskSet:
    """Tasks spawned by one owner, kept until done, crashes reported to ``on_crash``."""

    def __init__(
        self,
        *,
        group: asyncio.TaskGroup | None = None,
        on_crash: OnCrash | None = None,
    ) -> None:
        self._group = group
        self._on_crash = on_crash
        self._tasks: dict[asyncio.Task[Any], None] = {}  # insertion-ordered set

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        # Inside a group a crash would cancel the group's siblings; the owner decides
        # what a crash means instead, so the group only ever sees tasks end or cancel.
        if self._group is not None:
            task = self._group.create_task(self._contained(coro), name=name)
        else:
            task = asyncio.create_task(coro, name=name)
        self._tasks[task] = None
        task.add_done_callback(self._done)
        return task

    async def _contained(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await coro
        except Exception as exc:
            task = asyncio.current_task()
            assert task is not None
            self._report(task, exc)
            return None

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)
        if self._group is None and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self._report(task, exc)

    def _report(self, task: asyncio.Task[Any], exc: BaseException) -> None:
        log.error("task.crashed", task=task.get_name(), error=repr(exc), exc_info=exc)
        if self._on_crash is not None:
            self._on_crash(task, exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def names(self) -> list[str]:
        return [t.get_name() for t in self._tasks]

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every task of the set and wait until all have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
