"""The store's one writer thread: it owns the SQLite connection and group-commits.

Every store operation is a *job*: a function run on this thread against the open
transaction. The thread takes whatever jobs are waiting (up to ``batch_max``), runs them
all inside one ``BEGIN IMMEDIATE ... COMMIT`` and only then resolves their futures, so
an acknowledgement never precedes the commit, and concurrent producers share one fsync.
No timer batches anything: while one transaction syncs, the next batch queues up.

Batching does not rely on luck either: the jobs created in one event-loop iteration
(every message read from one socket read, every settle of a sender's pass) are handed
to the thread together, once the iteration's callbacks have run. Handed over one by
one, the thread woke on the first, committed it alone, and competed with the loop for
the GIL while the rest were still being created.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import structlog

from gatewayd.errors import BacklogFullError, GatewaydError, StoreError
from gatewayd.store.follow import Follower, bump_bulk
from gatewayd.store.lanes import Change
from gatewayd.store.model import Queue, StoreSettings
from gatewayd.store.schema import SQLITE_BUSY, connect

log = structlog.get_logger(__name__)

T = TypeVar("T")

# SQLite primary result codes (extended codes carry them in the low byte).
_SQLITE_LOCKED: Final = 6
_SQLITE_READONLY: Final = 8
_SQLITE_IOERR: Final = 10
_SQLITE_FULL: Final = 13

# How soon a refused device may try again: a full backlog drains within seconds, a full
# or read-only disk needs an operator.
RETRY_AFTER_BACKLOG: Final = 5.0
RETRY_AFTER_STORAGE: Final = 30.0

# A read-only connection stays read-only: reopen it, but not more than once a second.
_REOPEN_INTERVAL: Final = 1.0
# How long a lazy job (a delivered item's done) may wait for another job to ride with
# before it goes alone: at any rate above ~20 messages a second it never waits that long.
LAZY_SECONDS: Final = 0.05
# With a neighbour process on the file (gatewayd.store.follow): how often the backlog is
# counted again for its commits (in between, the figure follows our own changes only,
# as the PostgreSQL store's does).
RECOUNT_SECONDS: Final = 1.0


@dataclass(slots=True)
class Backlog:
    """Pending rows and their body bytes over all queues: what the limits apply to."""

    messages: int = 0
    bytes: int = 0


@dataclass(slots=True)
class Txn:
    """What a job sees: the connection inside the open transaction, and its bookkeeping.

    ``backlog`` is tentative: it becomes the store's figure only if the transaction
    commits. ``woken`` collects queues whose waiters to wake after the commit.
    """

    conn: sqlite3.Connection
    backlog: Backlog
    writer: Writer
    woken: set[Queue] = field(default_factory=set)
    puts: int = 0
    # For the in-memory lane index (gatewayd.store.lanes), applied on the loop after
    # the commit: the changes to pending sets, or (``reindex``: a bulk change, or another
    # process committed) a snapshot of every pending item read just before COMMIT.
    changes: list[Change] = field(default_factory=list)
    routes: list[tuple[str, str, float]] = field(default_factory=list)  # remembered
    reindex: bool = False
    bulk: bool = False  # set by a job that moved pending rows other than by inserting
    snapshot: Any = None
    proven: bool = False  # a probe allocated space: the store writes again


@dataclass(slots=True)
class _Job:
    fn: Callable[[Txn], Any]
    future: asyncio.Future[Any]
    intake: bool  # a put: a storage failure refuses intake instead of raising StoreError


class _StorageFailure(Exception):
    """SQLite could not write: disk full, read-only, locked too long, or an I/O error."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class Writer:
    """The thread that owns the connection. Create inside a running loop, then :meth:`start`."""

    def __init__(
        self,
        settings: StoreSettings,
        on_commit: Callable[[Txn], None],
        snapshot: Callable[[sqlite3.Connection], Any],
        follower: Follower | None = None,
    ) -> None:
        self.settings = settings
        self._snapshot = snapshot
        self._follower = follower
        self._counted_at = 0.0
        self.commits = 0
        self.rows_put = 0
        self.backlog = Backlog()
        self._on_commit = on_commit
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        # Jobs of the current loop iteration, handed over by _flush (on the loop), and
        # lazy jobs waiting for one to ride with (or for their timer).
        self._pending: list[_Job] = []
        self._lazy: list[_Job] = []
        self._flush_soon = False
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._conn: sqlite3.Connection | None = None
        self._data_version = -1
        self._recount = True
        self._reindex = False
        self._episode: str | None = None
        self._reopen_at: float | None = None
        self._closed = False
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._stopped: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._main, name=f"store-writer:{settings.path.name}", daemon=True
        )

    async def start(self) -> None:
        self._thread.start()
        try:
            await self._ready
        except BaseException:
            self._thread.join()
            raise

    async def stop(self) -> None:
        """Run what is queued, close the connection and join the thread."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        self._jobs.put(None)
        # Shielded: a cancelled close must still not leave the thread behind.
        await asyncio.shield(self._stopped)
        self._thread.join()

    async def call(self, fn: Callable[[Txn], T], *, intake: bool = False) -> T:
        """Run ``fn`` on the writer thread in the next transaction; return after COMMIT."""
        if self._closed:
            raise StoreError("the store is closed")
        return await self.submit(fn, intake=intake)

    def submit(
        self, fn: Callable[[Txn], T], *, intake: bool = False, lazy: bool = False
    ) -> asyncio.Future[T]:
        """Queue ``fn`` for the next transaction; the future resolves after COMMIT.

        For callers that need not wait. A ``lazy`` job (a delivered item's ``done``)
        does not start a transaction of its own: it rides on the next job's, or goes
        after :data:`LAZY_SECONDS` when none comes.
        """
        if self._closed:
            raise StoreError("the store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        job = _Job(fn, future, intake)
        if lazy:
            self._lazy.append(job)
            if self._lazy_timer is None:
                self._lazy_timer = self._loop.call_later(LAZY_SECONDS, self._flush)
        else:
            self._pending.append(job)
            if not self._flush_soon:
                self._flush_soon = True
                self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        # On the loop, after the callbacks of the iteration that queued the jobs.
        self._flush_soon = False
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        jobs, self._lazy, self._pending = self._lazy + self._pending, [], []
        if jobs:
            self._jobs.put(jobs)

    # --- on the writer thread -----------------------------------------------------------

    def _main(self) -> None:
        try:
            self._conn = connect(self.settings)
        except sqlite3.Error as exc:
            self._resolve(self._ready, StoreError(f"cannot open {self.settings.path}: {exc}"))
            return
        self._resolve(self._ready, None)
        try:
            self._serve()
        finally:
            self._shutdown()

    def _serve(self) -> None:
        waiting: deque[_Job] = deque()
        stop = False
        while not stop or waiting:
            if not waiting:
                jobs = self._jobs.get()
                if jobs is None:
                    return
                waiting.extend(jobs)
            while not stop and len(waiting) < self.settings.batch_max:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True  # after what is waiting
                else:
                    waiting.extend(more)
            count = min(len(waiting), self.settings.batch_max)
            self._run([waiting.popleft() for _ in range(count)])

    def _shutdown(self) -> None:
        # Fail whatever arrived after the stop marker, so no caller waits forever.
        while True:
            try:
                jobs = self._jobs.get_nowait()
            except queue.Empty:
                break
            for job in jobs or ():
                self._resolve(job.future, StoreError("the store is closed"))
        if self._conn is not None:
            # Fails while another process reads; the next open checkpoints then.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None
        self._resolve(self._stopped, None)

    def _run(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if not job.future.cancelled()]
        if not batch:
            return
        try:
            outcomes, txn = self._transaction(batch)
        except Exception as exc:  # every failure is handed to its caller
            self._rollback()
            self._recount = True
            if len(batch) > 1:
                # One bad job must not sink the others: give each its own transaction.
                for job in batch:
                    self._run([job])
                return
            self._fail(batch[0], exc)
            return
        self.commits += 1
        self.rows_put += txn.puts
        self.backlog = txn.backlog
        if (txn.puts or txn.proven) and self._episode is not None:
            log.info("store.recovered", after=self._episode, path=str(self.settings.path))
            self._episode = None
        # One hand-over to the loop per transaction, not one per job: each
        # call_soon_threadsafe wakes the loop, and a loop woken mid-batch competes with
        # this thread for the GIL (that alone cost most of the throughput).
        self._call_soon(self._deliver, [(job.future, result) for job, result in outcomes], txn)

    def _deliver(self, outcomes: list[tuple[asyncio.Future[Any], Any]], txn: Txn) -> None:
        # On the loop. The commit's changes first: a caller resumed by its future finds
        # the lane index as of its own commit.
        self._on_commit(txn)
        for future, outcome in outcomes:
            _settle(future, outcome)

    def _transaction(self, batch: list[_Job]) -> tuple[list[tuple[_Job, Any]], Txn]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        moved = self._refresh_backlog(conn, version)
        followed: list[Change] | None = None
        if moved and self._follower is not None and not self._reindex:
            followed = self._follower.catch_up(conn)
        reindex = self._reindex or (moved and followed is None)
        txn = Txn(conn, Backlog(self.backlog.messages, self.backlog.bytes), self, reindex=reindex)
        if followed:
            txn.changes.extend(followed)
            txn.woken.update(Queue(change.queue) for change in followed)
        outcomes: list[tuple[_Job, Any]] = []
        for job in batch:
            changes = conn.total_changes
            try:
                outcomes.append((job, job.fn(txn)))
            except GatewaydError as exc:
                if conn.total_changes != changes:
                    # A refusal after the job wrote: none of it may commit. The batch is
                    # rolled back and rerun job by job, where this one fails alone.
                    raise
                # Our own refusals (a full backlog) usually come before the job writes:
                # the others in the batch commit as if it had not run.
                outcomes.append((job, exc))
        if txn.bulk:
            bump_bulk(conn)
            txn.reindex = True
        if txn.reindex:
            txn.snapshot = self._snapshot(conn)
        follower = self._follower
        seen = follower.position(conn) if follower is not None else None
        conn.execute("COMMIT")
        # Only now: a transaction rolled back must leave the next one to read again
        # what this one read of the others' commits.
        self._data_version = version
        if follower is not None and seen is not None:
            follower.advance(seen)
        if txn.reindex:
            self._reindex = False
        return outcomes, txn

    def reindex_next(self) -> None:
        """Have the next transaction reload the lane index (a settle failed to write)."""
        self._reindex = True

    def _connection(self) -> sqlite3.Connection:
        if self._reopen_at is not None:
            if time.monotonic() < self._reopen_at:
                raise _StorageFailure("readonly", "the database is read-only")
            self._reopen_at = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        if self._conn is None:
            self._conn = connect(self.settings)
            self._recount = True
        return self._conn

    def _refresh_backlog(self, conn: sqlite3.Connection, version: int) -> bool:
        """True when another connection committed since our last transaction (or this
        is the first): the lane index then needs a snapshot or a catch-up. A recount
        after our own rollback needs neither: nothing of it reached the index."""
        # data_version moves when another connection (the queue CLI) commits: only then
        # is a recount needed; our own commits keep the figure exact.
        if version == self._data_version and not self._recount:
            return False
        now = time.monotonic()
        # A neighbour commits all the time: count at most once a RECOUNT_SECONDS for it.
        if self._recount or self._follower is None or now - self._counted_at >= RECOUNT_SECONDS:
            messages, size = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM items WHERE state = 'pending'"
            ).fetchone()
            self.backlog = Backlog(messages, size)
            self._counted_at = now
        self._recount = False
        return bool(version != self._data_version)

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            # SQLite may have rolled back by itself already (SQLITE_FULL can).
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _fail(self, job: _Job, exc: Exception) -> None:
        failure = _classify(exc)
        if failure is None:
            error: Exception = (
                exc if isinstance(exc, GatewaydError) else StoreError(f"store failure: {exc}")
            )
            if not isinstance(exc, GatewaydError):
                log.error("store.error", error=str(exc), path=str(self.settings.path))
            self._resolve(job.future, error)
            return
        if failure.kind == "readonly":
            self._reopen_at = time.monotonic() + _REOPEN_INTERVAL
        if job.intake:
            self.refused(failure.kind, failure.detail)
            self._resolve(
                job.future, BacklogFullError(failure.detail, retry_after=RETRY_AFTER_STORAGE)
            )
        else:
            self._resolve(job.future, StoreError(failure.detail))

    @property
    def refusing(self) -> str | None:
        """Why writes are refused now (``readonly``, ``disk``, ...), until one succeeds."""
        return self._episode

    def refused(self, kind: str, detail: str) -> None:
        """Log the start of a refusal episode once, not once per refused message."""
        if self._episode == kind:
            return
        self._episode = kind
        event = "store.readonly" if kind == "readonly" else "store.full"
        log.error(event, cause=kind, detail=detail, path=str(self.settings.path))

    def _resolve(self, future: asyncio.Future[Any], outcome: Any) -> None:
        self._call_soon(_settle, future, outcome)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        # A closed loop means nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return  # the caller was cancelled
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


_FAILURES: Final = {
    _SQLITE_FULL: ("disk", "the disk is full"),
    _SQLITE_READONLY: ("readonly", "the database is read-only"),
    SQLITE_BUSY: ("busy", "the database stayed locked"),
    _SQLITE_LOCKED: ("busy", "the database stayed locked"),
    _SQLITE_IOERR: ("io", "the database cannot be written"),
}


def _classify(exc: Exception) -> _StorageFailure | None:
    """A storage failure refuses intake; anything else (corruption, a bug) is an error."""
    if isinstance(exc, _StorageFailure):
        return exc
    if not isinstance(exc, sqlite3.Error):
        return None
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code not in _FAILURES:
        return None
    kind, what = _FAILURES[code]
    return _StorageFailure(kind, f"{what}: {exc}")
