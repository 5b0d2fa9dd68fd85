"""Drains one store queue: due items in, outcomes out, per-lane order kept.

The uplink sender, the report sender and the downlink dispatcher are all this loop with
a different handler. A lane (one device) has at most one item in flight, so a device's
messages leave in the order they were accepted, while different devices proceed
concurrently.

Items come from the store's in-memory lane index (:meth:`Store.take`): a message just
stored goes out without a query. A delivered item's ``done`` is not waited for: it
rides on the store's next transaction, and the lane's next item goes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from gatewayd import metrics
from gatewayd.errors import StoreError
from gatewayd.log import bound_message
from gatewayd.retry import CircuitBreaker, RetryPolicy
from gatewayd.store import Item, Queue, Store
from gatewayd.tasks import TaskSet

log = structlog.get_logger(__name__)

# After a failed take (the store unreachable): how long a worker waits to look again.
TAKE_RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Done:
    """Handled for good: delivered, or a failure already reported."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure: try again after backoff (never sooner than ``after``)."""

    error: str
    after: float | None = None
    peer_down: bool = True  # counts against the circuit breaker
    # The peer answered (e.g. "register first"): it is up, so the breaker closes even
    # though this message must wait.
    answered: bool = False


@dataclass(frozen=True, slots=True)
class Dead:
    """A permanent failure: to the dead-letter queue."""

    reason: str


Outcome = Done | Retry | Dead
Handler = Callable[[Item], Awaitable[Outcome]]


class QueueWorker:
    """Runs ``handler`` on due items of ``queue`` until :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        queue: Queue,
        handler: Handler,
        *,
        policy: RetryPolicy,
        concurrency: int,
        breaker: CircuitBreaker | None = None,
        ready: asyncio.Event | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._queue = queue
        self._handler = handler
        self._policy = policy
        self._concurrency = concurrency
        self._breaker = breaker
        self._ready = ready
        self._clock = clock  # the wall clock of not_before (injectable for tests)
        self._busy: dict[str, asyncio.Task[None]] = {}  # lane -> its item in flight
        self._tasks = TaskSet()
        self._stopping = asyncio.Event()
        # Set whenever an item in flight finishes. Waiting on it costs the same however
        # many are in flight; asyncio.wait() over the busy tasks added and removed a
        # callback on each of them (64) for every message.
        self._freed = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    async def run(self) -> None:
        if self._ready is not None:
            await self._ready.wait()
        while not self._stopping.is_set():
            room = self._concurrency - len(self._busy)
            if room <= 0:
                self._freed.clear()
                await self._freed.wait()
                continue
            # While the breaker is not closed it lets exactly one probe through; once
            # that probe settles the loop looks again at once (a success closed it).
            if self._breaker is not None and self._breaker.state != "closed":
                room = 1 if not self._busy else 0
                if room == 0:
                    await asyncio.wait(list(self._busy.values()))
                    continue
            try:
                items = await self._store.take(self._queue, limit=room, now=self._clock())
            except StoreError as exc:
                # The store is away (a database restarting): what is pending stays
                # pending. Look again in a moment rather than end the gateway.
                log.warning("worker.take_failed", error=str(exc))
                await self._pause(TAKE_RETRY_SECONDS)
                continue
            if not items:
                await self._idle()
                continue
            # Ask the breaker only with work in hand: allow() may hand out the one probe,
            # and a worker with nothing to send would waste it while the worker sharing
            # the breaker waited out a whole probe timeout.
            if self._breaker is not None and not self._breaker.allow():
                for item in items:  # back to their lanes, untouched
                    self._store.release(item.id)
                # At most a second: another worker's probe may close the breaker meanwhile.
                await self._pause(min(self._breaker.next_probe_in(), 1.0))
                continue
            for item in items:
                task = self._tasks.spawn(f"{self._queue}:{item.msg_id}", self._handle(item))
                self._busy[item.lane] = task
                task.add_done_callback(self._freer(item.lane))

    def _freer(self, lane: str) -> Callable[[asyncio.Task[None]], None]:
        def free(_task: asyncio.Task[None]) -> None:
            self._busy.pop(lane, None)
            self._freed.set()

        return free

    async def _idle(self) -> None:
        # A lane freed with more to send wakes wait_for_work (the store's lane index);
        # a freed slot may matter too (a breaker probe that settled).
        self._freed.clear()
        waits = [
            asyncio.ensure_future(self._store.wait_for_work(self._queue, timeout=1.0)),
            asyncio.ensure_future(self._stopping.wait()),
            asyncio.ensure_future(self._freed.wait()),
        ]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for fut in waits:
            fut.cancel()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=max(seconds, 0.05))

    async def _handle(self, item: Item) -> None:
        with bound_message(item.msg_id, queue=str(self._queue)):
            try:
                try:
                    outcome = await self._handler(item)
                except Exception as exc:  # a bug in a handler must not kill the worker
                    log.exception("worker.handler_failed", error=repr(exc))
                    outcome = Retry(f"internal error: {exc!r}", peer_down=False)
                try:
                    await self._settle(item, outcome)
                    metrics.settled(item, outcome)
                except StoreError as exc:
                    # The item stays pending in the store and goes out again: at least
                    # once. Hold this lane a moment so a failing disk is not hammered.
                    log.error("worker.settle_failed", error=str(exc))
                    await asyncio.sleep(self._policy.initial)
            finally:
                # Settled or not (cancelled at stop), expiry may look at it again.
                self._store.release(item.id)

    async def _settle(self, item: Item, outcome: Outcome) -> None:
        if isinstance(outcome, Done):
            self._store.done_soon(item)
            if self._breaker is not None:
                self._breaker.success()
        elif isinstance(outcome, Dead):
            await self._store.dead(item.id, reason=outcome.reason)
            if self._breaker is not None:
                self._breaker.success()  # the peer answered: it is up
        else:
            delay = self._policy.delay(item.attempts + 1, retry_after=outcome.after)
            await self._store.retry_later(
                item.id, not_before=self._clock() + delay, error=outcome.error
            )
            log.info("message.retry_scheduled", delay=round(delay, 3), error=outcome.error)
            if self._breaker is not None and outcome.answered:
                self._breaker.success()
            elif self._breaker is not None and outcome.peer_down:
                if outcome.after is not None:
                    self._breaker.hold(outcome.after)
                self._breaker.failure()

    async def stop(self, timeout: float) -> None:
        """Take no new items; give those in flight ``timeout`` seconds, then cancel them.

        A cancelled item was not settled, so it is still pending in the store and goes
        out again after the next start.
        """
        self._stopping.set()
        tasks = list(self._busy.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
