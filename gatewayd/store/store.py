"""The durable store: uplink, report and downlink queues, DLQ, dedup and small tables.

All SQLite work runs on the :class:`~gatewayd.store.writer.Writer` thread; the methods
here are thin async wrappers that build a job, hand it over and await the commit. The
senders' side reads an in-memory view of the pending items (:mod:`gatewayd.store.lanes`)
that every commit keeps in step: :meth:`Store.take` hands out lane heads without a query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import structlog

from gatewayd.errors import BacklogFullError, StoreError
from gatewayd.store import queries
from gatewayd.store.follow import Follower, Split
from gatewayd.store.lanes import Change, Lanes
from gatewayd.store.model import (
    Item,
    PartResult,
    PutRequest,
    PutResult,
    Queue,
    Route,
    State,
    StoreSettings,
)
from gatewayd.store.schema import ITEM_COLUMNS, encode_body, row_to_item
from gatewayd.store.writer import RETRY_AFTER_BACKLOG, Txn, Writer

log = structlog.get_logger(__name__)

_SELECT = f"SELECT {ITEM_COLUMNS} FROM items"  # noqa: S608 - a constant column list
# Rejected intake records kept at most (``gatewayd queue purge --queue intake`` clears
# them); past it a rejection is still logged and counted, not stored.
MAX_REJECTED = 10_000
# The queues a sender works: the ones the lane index keeps.
WORKED = frozenset({Queue.UPLINK, Queue.REPORT, Queue.DOWNLINK})
_WORKED_NAMES = frozenset(q.value for q in WORKED)
_NO_LANES = Lanes()  # for queues the index does not keep
_ROUTES = "routes"  # the snapshot's key for the reply routes (not a queue's name)
# Bodies read by id per statement when a take finds them not in memory.
_FETCH_CHUNK = 500
# The probe row: a few pages, as a stored message needs (a page is 4 KiB by default).
_PROBE_BYTES = 16 * 1024


class SqliteStore:
    """The embedded backend: durable queues in one SQLite file (WAL) for one instance.

    Open with :meth:`open`, end with :meth:`close`.

    Usable from several processes at once (the ``gatewayd queue`` CLI next to a live
    daemon): WAL mode, and a busy timeout for the short moments another writer holds
    the lock. With a ``split`` (``gateway.processes = 2``) another process sends from
    the queues this one does not: only this one's are indexed and expired here, and the
    index follows the other's inserts (:mod:`.follow`).
    """

    def __init__(self, settings: StoreSettings, split: Split | None = None) -> None:
        self.settings = settings
        self._split = split
        worked = WORKED if split is None else WORKED & split.works
        follower = None if split is None else Follower(frozenset(q.value for q in worked))
        self._writer = Writer(settings, self._committed, _snapshot, follower)
        self._catching_up = False  # a nudge's transaction is queued
        self._lanes: dict[Queue, Lanes] = {q: Lanes() for q in worked}
        # Reply routes (service id -> origin JSON, expiry), kept in step with the routes
        # table like the lane index: a device's uplink without a destination looks its
        # route up here, not in a transaction of its own.
        self._routes: dict[str, tuple[str, float]] = {}
        self._wakeups: dict[Queue, asyncio.Event] = {q: asyncio.Event() for q in Queue}
        # A counter per queue, bumped on every commit that added work to it, and the
        # value seen by the last due(): wait_for_work() returns at once if work arrived
        # between the two, so that wake-up is never lost.
        self._generation: dict[Queue, int] = dict.fromkeys(Queue, 0)
        self._seen: dict[Queue, int] = dict.fromkeys(Queue, 0)
        # Items handed out by take()/due() and not yet settled (id -> queue, lane), and
        # items an expiry is deciding on: expire() leaves the first alone and take()
        # never hands out the second, so a message being sent right now is never also
        # expired (delivered *and* dead). Both live on the loop only.
        self._claimed: dict[int, tuple[Queue, str]] = {}
        self._expiring: set[int] = set()

    @property
    def refusing(self) -> str | None:
        """Why the store refuses writes right now (a full disk, read-only), else ``None``;
        cleared by the next write that succeeds."""
        return self._writer.refusing

    @classmethod
    async def open(cls, settings: StoreSettings, split: Split | None = None) -> SqliteStore:
        """Open (creating if needed) the database and start the writer thread."""
        store = cls(settings, split)
        await store._writer.start()
        # The first transaction reads the pending items into the lane index.
        await store._writer.call(lambda txn: None)
        if split is not None:
            split.neighbour.watch(store._nudged)
        log.info(
            "store.opened",
            path=str(settings.path),
            synchronous=settings.synchronous,
            max_messages=settings.max_messages,
            max_bytes=settings.max_bytes,
        )
        return store

    async def close(self) -> None:
        """Finish queued work, close the database and join the writer thread.

        Pending items stay in the database for the next start.
        """
        await self._writer.stop()
        log.info("store.closed", path=str(self.settings.path))

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- intake ------------------------------------------------------------------------

    async def put(
        self,
        queue: Queue,
        *,
        msg_id: str,
        dedup_key: str,
        lane: str,
        body: dict[str, Any],
        expires_at: float | None = None,
    ) -> PutResult:
        """Store one message; return only after its transaction has committed.

        Concurrent puts share one transaction (group commit). A ``dedup_key`` stored
        before (pending, done within the dedup window, or dead) returns the existing id
        with ``duplicate=True`` and writes nothing. Raises :class:`BacklogFullError` when
        a backlog limit would be exceeded or the disk is full or read-only; nothing is
        stored then.
        """
        request = PutRequest(
            msg_id=msg_id, dedup_key=dedup_key, lane=lane, body=body, expires_at=expires_at
        )
        (result,) = await self.put_many(queue, [request])
        return result

    async def put_many(
        self, queue: Queue, requests: Sequence[PutRequest], *, route: Route | None = None
    ) -> list[PutResult]:
        """Store several messages atomically: all of them (or their duplicates), or none.

        Useful for the segments of one message: a refusal never leaves half of them.
        ``route``, when given, is remembered in the same transaction (not when refused).
        """
        now = time.time()
        remember = None
        if route is not None:
            remember = (route.service_id, encode_body(route.origin), now + route.ttl)

        async def store(encoded: list[tuple[PutRequest, str]]) -> list[PutResult]:
            def job(txn: Txn) -> list[PutResult]:
                results = _put_all(txn, queue, encoded, now)
                if remember is not None:
                    _remember_route(txn, *remember)
                return results

            return await self._writer.call(job, intake=True)

        return await queries.put_each_once(queue, requests, store)

    async def put_part(
        self,
        request: PutRequest,
        *,
        into: Queue,
        assemble: Callable[[list[dict[str, Any]]], PutRequest | None],
    ) -> PartResult:
        """Store one part of a larger message; once the set is whole, queue the whole.

        Parts wait in :attr:`Queue.SEGMENT`; ``request.lane`` names their set. In the
        part's own transaction, ``assemble`` gets the bodies of the set's pending parts
        plus this one (arrival order) and returns the whole message's put, or ``None``
        while parts are missing; it may raise a ``GatewaydError`` (an inconsistent set),
        and then nothing is written. The whole goes into ``into`` and its parts become
        done in that same transaction, so a crash leaves either the parts or the whole,
        never both, never neither. A set expires together: every part takes the
        ``expires_at`` of the set's first part. A part whose ``dedup_key`` was stored
        before (pending, done or dead) is a duplicate and changes nothing.
        """
        body = encode_body(request.body)
        now = time.time()
        result: PartResult = await self._writer.call(
            lambda txn: _put_part(txn, request, body=body, into=into, assemble=assemble, now=now),
            intake=True,
        )
        if result.duplicate:
            log.debug("store.duplicate", msg_id=request.msg_id, queue=Queue.SEGMENT.value)
        return result

    async def put_rejected(
        self, *, msg_id: str, dedup_key: str, lane: str, reason: str, body: dict[str, Any]
    ) -> str:
        """Record device input refused for good at intake, dead on arrival (queue
        ``intake``), so the operator sees it with its reason. Not held to the backlog
        limits (it is not work to do) but to :data:`MAX_REJECTED` records, so a device
        sending garbage cannot fill the disk through the DLQ; a full disk raises
        :class:`BacklogFullError` like any intake. A record with the same ``dedup_key``
        is stored once (a redelivered poison message). Returns ``"stored"``,
        ``"duplicate"`` or ``"dlq_full"``."""
        encoded = encode_body(body)
        now = time.time()

        def job(txn: Txn) -> str:
            (kept,) = txn.conn.execute(
                "SELECT count(*) FROM items INDEXED BY items_state"
                " WHERE state = 'dead' AND queue = 'intake'"
            ).fetchone()
            if kept >= MAX_REJECTED:
                return "dlq_full"
            cursor = txn.conn.execute(
                "INSERT INTO items (queue, msg_id, dedup_key, lane, body, size, created,"
                " queued, state, last_error, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                " 'dead', ?, ?) ON CONFLICT (queue, dedup_key) DO NOTHING",
                (
                    Queue.INTAKE.value,
                    msg_id,
                    dedup_key,
                    lane,
                    encoded,
                    len(encoded.encode()),
                    now,
                    now,
                    reason,
                    now,
                ),
            )
            return "stored" if cursor.rowcount > 0 else "duplicate"

        return await self._writer.call(job, intake=True)

    # --- the sender's side -------------------------------------------------------------

    async def due(
        self,
        queue: Queue,
        *,
        limit: int,
        now: float | None = None,
        busy_lanes: Collection[str] = (),
    ) -> list[Item]:
        """The head pending item of each lane, if due, oldest first, at most ``limit``.

        Only a lane's head (its lowest id) is ever returned, so a lane's second message
        waits until its first is done or dead: that is the per-device order. Lanes in
        ``busy_lanes`` (being sent right now) are left out.
        """
        at = time.time() if now is None else now
        busy = frozenset(busy_lanes)
        generation = self._generation[queue]

        def job(txn: Txn) -> list[Item]:
            # Walk pending rows oldest first and keep the lane heads: the walk stops
            # after ``limit`` hits, so its cost follows ``limit``, not the backlog
            # (grouping every lane first took 160 ms at 100k lanes).
            rows = txn.conn.execute(
                f"{_SELECT} AS i WHERE queue = ? AND state = 'pending' AND not_before <= ?"  # noqa: S608 - constant
                " AND NOT EXISTS (SELECT 1 FROM items AS j INDEXED BY items_head"
                " WHERE j.queue = i.queue AND j.lane = i.lane AND j.state = 'pending'"
                " AND j.id < i.id)"
                " ORDER BY id",
                (queue.value, at),
            )
            items: list[Item] = []
            for row in rows:
                if row[3] in busy:
                    continue
                if row[0] in self._expiring:
                    continue
                items.append(row_to_item(row))
                if len(items) >= limit:
                    break
            return items

        items = await self._writer.call(job)
        self._seen[queue] = generation
        # Claimed on the loop, where expire() decides: an item an expiry took meanwhile
        # is not handed out.
        items = [i for i in items if i.id not in self._expiring]
        self._claimed.update((item.id, (queue, item.lane)) for item in items)
        return items

    async def take(self, queue: Queue, *, limit: int, now: float | None = None) -> list[Item]:
        """Like :meth:`due`, from the in-memory lane index: up to ``limit`` lane heads
        not handed out yet, due at ``now``, oldest lane first. A lane stays out until
        its item is settled (:meth:`done_soon`, :meth:`dead`, :meth:`retry_later`) or
        released (:meth:`release`). Costs no query unless bodies must be read from disk.
        """
        at = time.time() if now is None else now
        lanes = self._lanes[queue]
        self._seen[queue] = self._generation[queue]
        chosen = lanes.take(limit, at)
        if not chosen:
            return []
        items = [item for _, _, item in chosen if item is not None]
        missing = {item_id: lane for lane, item_id, item in chosen if item is None}
        if missing:
            ahead = lanes.upcoming(list(missing.values()))
            try:
                fetched = await self._writer.call(lambda txn: _fetch(txn, [*missing, *ahead]))
            except BaseException:
                for item_id, lane in missing.items():
                    lanes.release(item_id, lane)
                for item in items:
                    lanes.release(item.id, item.lane)
                raise
            for item in fetched:
                if missing.pop(item.id, None) is not None:
                    items.append(item)
                else:
                    lanes.keep(item)  # a later round's body, read along
            for item_id, lane in missing.items():  # no longer pending (another process)
                lanes.remove(item_id, lane)
        ready: list[Item] = []
        for item in sorted(items, key=lambda i: i.id):
            if item.not_before > at:  # read from disk: a retry not due yet
                lanes.park(item.id, item.lane, item.not_before)
                continue
            self._claimed[item.id] = (queue, item.lane)
            ready.append(item)
        return ready

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        """Return when a put to ``queue`` commits, or after ``timeout`` seconds.

        Returns at once when work arrived since the last :meth:`due` on this queue.
        """
        if self._generation[queue] != self._seen[queue]:
            return
        event = self._wakeups[queue]
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return

    def _wake(self, queue: Queue) -> None:
        self._generation[queue] += 1
        self._wakeups[queue].set()
        self._wakeups[queue] = asyncio.Event()

    def _committed(self, txn: Txn) -> None:
        # On the loop, for every commit in commit order: the lane index follows it.
        if txn.snapshot is not None:
            for queue, lanes in self._lanes.items():
                lanes.load(txn.snapshot.get(queue.value, []))
                self._wake(queue)
            self._routes = {sid: (origin, exp) for sid, origin, exp in txn.snapshot[_ROUTES]}
        else:
            for change in txn.changes:
                self._apply(change)
            for service_id, origin, expires in txn.routes:
                self._routes[service_id] = (origin, expires)
        for queue in txn.woken:
            self._wake(queue)
        if self._split is not None and not txn.woken <= self._split.works:
            self._split.neighbour.nudge()  # work for the other process: committed now

    def _nudged(self) -> None:
        # The other process committed work for us: a transaction of ours (an empty one,
        # unless other jobs share it) reads it into the index. One queued at a time.
        if self._catching_up:
            return
        try:
            future = self._writer.submit(lambda txn: None)
        except StoreError:
            return  # closed
        self._catching_up = True
        future.add_done_callback(self._caught_up)

    def _caught_up(self, future: asyncio.Future[None]) -> None:
        self._catching_up = False
        if not future.cancelled() and future.exception() is not None:
            log.warning("store.follow_failed", error=str(future.exception()))

    def _apply(self, change: Change) -> None:
        queue = Queue(change.queue)
        lanes = self._lanes.get(queue)
        if lanes is None:
            return  # a queue another process sends from
        if change.kind == "add":
            woke = lanes.add(change.id, change.lane, change.item)
        elif change.kind == "finish":
            self._claimed.pop(change.id, None)
            lanes.settling.discard(change.id)
            woke = lanes.remove(change.id, change.lane)
        else:  # park
            self._claimed.pop(change.id, None)
            lanes.park(change.id, change.lane, change.not_before)
            woke = False
        if woke:
            self._wake(queue)

    async def done(self, item_id: int) -> None:
        """Delivered: drop the body, keep the row as a dedup tombstone."""
        now = time.time()
        await self._writer.call(lambda txn: _finish(txn, item_id, State.DONE, None, now))

    def done_soon(self, item: Item) -> None:
        """Delivered, without waiting for the commit: the lane's next item may go at
        once, and the write rides on the next transaction (with the next intake batch;
        alone after 50 ms if none comes).

        A crash before that commit sends the item again after the restart (at least
        once, in lane order: it is still its lane's head). A failed write is logged and
        the index reloaded from disk, where the item is still pending.
        """
        claim = self._claimed.pop(item.id, None)
        lanes = self._lanes.get(item.queue)
        if claim is not None and lanes is not None:
            lanes.settling.add(item.id)
            if lanes.remove(item.id, item.lane):
                self._wake(item.queue)
        now = time.time()
        future = self._writer.submit(
            lambda txn: _finish(txn, item.id, State.DONE, None, now), lazy=True
        )
        future.add_done_callback(lambda f: self._done_written(f, item))

    def _done_written(self, future: asyncio.Future[Any], item: Item) -> None:
        lanes = self._lanes.get(item.queue)
        if lanes is not None:
            lanes.settling.discard(item.id)
        if future.cancelled() or future.exception() is None:
            return
        log.error("store.settle_failed", msg_id=item.msg_id, error=str(future.exception()))
        # Still pending on disk: the next transaction reads the index again, and the
        # item goes out again (at least once).
        self._writer.reindex_next()

    def release(self, item_id: int) -> None:
        """An item handed out that was not settled (its send was cancelled): it stays
        pending, its lane may hand it out again, and it may expire again. Settling
        releases it by itself."""
        claim = self._claimed.pop(item_id, None)
        if claim is None:
            return
        queue, lane = claim
        lanes = self._lanes.get(queue)
        if lanes is not None and lanes.release(item_id, lane):
            self._wake(queue)

    async def retry_later(self, item_id: int, *, not_before: float, error: str) -> None:
        """A transient failure: count the attempt and hold the item until ``not_before``."""

        def job(txn: Txn) -> None:
            row = txn.conn.execute(
                "UPDATE items SET attempts = attempts + 1, not_before = ?, last_error = ?"
                " WHERE id = ? AND state = 'pending' RETURNING queue, lane",
                (not_before, error, item_id),
            ).fetchone()
            if row is not None and row[0] in _WORKED_NAMES:
                txn.changes.append(Change("park", row[0], item_id, row[1], None, not_before))

        await self._writer.call(job)

    async def dead(self, item_id: int, *, reason: str) -> None:
        """A permanent failure: move the item to the dead-letter queue."""
        now = time.time()
        msg_id = await self._writer.call(lambda txn: _finish(txn, item_id, State.DEAD, reason, now))
        if msg_id is not None:
            log.warning("store.dead", msg_id=msg_id, id=item_id, reason=reason)

    async def expire(
        self,
        now: float | None = None,
        *,
        report: Callable[[Item], tuple[Queue, PutRequest] | None] | None = None,
    ) -> list[Item]:
        """Move pending items past their ``expires_at`` or ``max_age`` to the DLQ.

        Items being sent right now (handed out by :meth:`due`, not yet settled) are left
        for a later sweep: their send decides. ``report`` builds the failure report an
        expired item calls for; it is stored in the same transaction as the expiry, so
        a full disk delays both and a crash loses neither. Returns the expired items.
        """
        at = time.time() if now is None else now
        oldest = at - self.settings.max_age

        def candidates(txn: Txn) -> list[Item]:
            # Two index range reads (the planner, without statistics, would walk every
            # pending row for the OR): the cost follows what expires, not the backlog.
            rows = txn.conn.execute(
                f"{_SELECT} INDEXED BY items_expires"
                " WHERE state = 'pending' AND expires_at <= ?"
                f" UNION {_SELECT} INDEXED BY items_queued"
                " WHERE state = 'pending' AND queued <= ? ORDER BY id",
                (at, oldest),
            ).fetchall()
            return [row_to_item(row) for row in rows]

        found = await self._writer.call(candidates)
        # Decided on the loop, where take() hands items out: one being sent stays for
        # its send; the others are held, so no sender takes them while they expire.
        # Another process's queues are its own to expire.
        chosen = [
            item
            for item in found
            if (self._split is None or item.queue in self._split.works)
            and item.id not in self._claimed
            and item.id not in self._lanes.get(item.queue, _NO_LANES).settling
        ]
        if not chosen:
            return []
        held: list[Item] = []
        for item in chosen:
            self._expiring.add(item.id)
            lanes = self._lanes.get(item.queue)
            if lanes is not None and lanes.hold(item.id, item.lane):
                held.append(item)

        unreportable: list[tuple[Item, str]] = []

        def job(txn: Txn) -> list[Item]:
            unreportable.clear()  # the writer may run a job twice (batch, then alone)
            expired: list[Item] = []
            for item in chosen:
                reason = queries.expiry_reason(item, at)
                cursor = txn.conn.execute(
                    "UPDATE items SET state = 'dead', last_error = ?, finished = ?"
                    " WHERE id = ? AND state = 'pending'",
                    (reason, at, item.id),
                )
                if cursor.rowcount == 0:
                    continue  # settled meanwhile (another process)
                txn.backlog.messages -= 1
                txn.backlog.bytes -= item.size
                _finished(txn, item.queue.value, item.id, item.lane)
                expired.append(queries.as_expired(item, reason, at))
                built = queries.failure_report(item, report, unreportable)
                if built is not None:
                    _put_report(txn, *built, now=at)
            return expired

        try:
            expired = await self._writer.call(job)
        finally:
            self._expiring.difference_update(item.id for item in chosen)
            for item in held:  # those not expired (a failed write) may go again
                if self._lanes[item.queue].release(item.id, item.lane):
                    self._wake(item.queue)
        queries.log_expired(expired, unreportable)
        return expired

    # --- inspection and the DLQ --------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Counts, bytes and oldest age per queue, the backlog against its limits, and
        this process's commit counters (``commits``: transactions, ``rows_put``)."""
        now = time.time()

        def job(txn: Txn) -> dict[str, Any]:
            queues = queries.queue_counts(txn.conn.execute(queries.COUNTS_SQL), now)
            (pages,) = txn.conn.execute("PRAGMA page_count").fetchone()
            (page_size,) = txn.conn.execute("PRAGMA page_size").fetchone()
            return {
                "queues": queues,
                "db_bytes": pages * page_size,
                "backlog": {
                    "messages": txn.backlog.messages,
                    "bytes": txn.backlog.bytes,
                    "max_messages": self.settings.max_messages,
                    "max_bytes": self.settings.max_bytes,
                },
                "commits": txn.writer.commits,
                "rows_put": txn.writer.rows_put,
                "path": str(self.settings.path),
                "synchronous": self.settings.synchronous,
            }

        return await self._writer.call(job)

    async def list_items(
        self, *, queue: Queue | None, state: str | None, limit: int, after: int = 0
    ) -> list[Item]:
        """Items by id, optionally of one queue and state; ``after`` pages on by id."""
        where, params = queries.list_filter(queue=queue, state=state, after=after, mark="?")
        sql = f"{_SELECT} WHERE {where} ORDER BY id LIMIT ?"
        params.append(limit)

        def job(txn: Txn) -> list[Item]:
            return [row_to_item(row) for row in txn.conn.execute(sql, params)]

        return await self._writer.call(job)

    async def get(self, item_id: int) -> Item | None:
        """One item by id, in any state."""

        def job(txn: Txn) -> Item | None:
            row = txn.conn.execute(f"{_SELECT} WHERE id = ?", (item_id,)).fetchone()
            return None if row is None else row_to_item(row)

        return await self._writer.call(job)

    async def replay(self, item_id: int) -> bool:
        """Move a dead item back to pending, attempts reset; it keeps its id and msgId.

        Its ``expires_at`` is cleared: replaying is the operator's decision to try again,
        and would be pointless if the item expired again at once. Replays are not held to
        the backlog limits (the operator may be draining a full DLQ on purpose).
        """
        now = time.time()

        def job(txn: Txn) -> str | None:
            # A rejected intake record is not a message: there is nothing to send.
            row = txn.conn.execute(
                "SELECT msg_id, queue, size FROM items WHERE id = ? AND state = 'dead'"
                " AND queue != 'intake'",
                (item_id,),
            ).fetchone()
            if row is None:
                return None
            msg_id, queue, size = row
            txn.conn.execute(
                "UPDATE items SET state = 'pending', attempts = 0, not_before = 0,"
                " expires_at = NULL, last_error = NULL, finished = NULL, queued = ?"
                " WHERE id = ?",
                (now, item_id),
            )
            txn.backlog.messages += 1
            txn.backlog.bytes += size
            txn.woken.add(Queue(queue))
            # An older id back in its lane, ahead of later items: read the index again.
            txn.bulk = True
            return str(msg_id)

        msg_id = await self._writer.call(job)
        if msg_id is None:
            return False
        log.info("store.replayed", msg_id=msg_id, id=item_id)
        return True

    async def purge(
        self, *, queue: Queue | None, state: str = "dead", older_than: float | None = None
    ) -> int:
        """Delete items in ``state`` (default: the DLQ), optionally only those that
        finished (or, if pending, were created) more than ``older_than`` seconds ago.

        Deleting also forgets their dedup keys. Returns how many were deleted.
        """
        where, params = queries.purge_filter(
            queue=queue, state=state, older_than=older_than, mark="?"
        )

        def job(txn: Txn) -> int:
            if state == State.PENDING:
                count, size = txn.conn.execute(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM items WHERE {where}",  # noqa: S608
                    params,
                ).fetchone()
                txn.backlog.messages -= count
                txn.backlog.bytes -= size
                txn.bulk = True
            return txn.conn.execute(f"DELETE FROM items WHERE {where}", params).rowcount  # noqa: S608

        count = await self._writer.call(job)
        log.info("store.purged", count=count, state=state, queue=queue and str(queue))
        return count

    async def probe(self) -> None:
        """Write (and delete) a row that needs free space: while the store refuses writes,
        this ends the refusal once space is back, even with no intake to prove it (a load
        balancer that followed ``/readyz`` sends none). Raises as a put would."""

        def job(txn: Txn) -> None:
            txn.conn.execute(
                "INSERT OR REPLACE INTO kv (transport, key, value, expires)"
                " VALUES ('', 'probe', ?, 0)",
                ("x" * _PROBE_BYTES,),
            )
            txn.conn.execute("DELETE FROM kv WHERE transport = '' AND key = 'probe'")
            txn.proven = True

        await self._writer.call(job, intake=True)

    async def prune(self, now: float | None = None) -> int:
        """Forget dedup tombstones older than ``dedup_window``, expired reply routes and
        expired transport key/value rows.

        Returns the number of tombstones dropped.
        """
        at = time.time() if now is None else now

        def job(txn: Txn) -> tuple[int, int]:
            routes = txn.conn.execute("DELETE FROM routes WHERE expires <= ?", (at,)).rowcount
            txn.conn.execute("DELETE FROM kv WHERE expires <= ?", (at,))
            tombstones = txn.conn.execute(
                "DELETE FROM items INDEXED BY items_done WHERE state = 'done' AND finished <= ?",
                (at - self.settings.dedup_window,),
            ).rowcount
            return routes, tombstones

        routes, tombstones = await self._writer.call(job)
        if routes:  # forget them in memory too (route() already ignores them)
            self._routes = {k: v for k, v in self._routes.items() if v[1] > at}
        return tombstones

    async def limit_size(self, max_bytes: int | None) -> None:
        """Cap the database file at about ``max_bytes`` (``None``: no cap but the disk's).

        Reaching the cap behaves exactly like a full disk, which is how tests and
        operators can rehearse that case. The cap lasts until the store is closed.
        """

        def job(txn: Txn) -> None:
            (page_size,) = txn.conn.execute("PRAGMA page_size").fetchone()
            pages = 0xFFFFFFFE if max_bytes is None else max(1, max_bytes // page_size)
            txn.conn.execute(f"PRAGMA max_page_count = {int(pages)}")

        await self._writer.call(job)

    # --- reply routes and learned devices ----------------------------------------------

    async def remember_route(self, service_id: str, origin: dict[str, Any], ttl: float) -> None:
        """Remember for ``ttl`` seconds that ``origin`` last sent to UE ``service_id``."""
        expires = time.time() + ttl
        encoded = encode_body(origin)

        await self._writer.call(lambda txn: _remember_route(txn, service_id, encoded, expires))

    async def route(self, service_id: str, now: float | None = None) -> dict[str, Any] | None:
        """The originator to send a reply from ``service_id`` to, if still remembered.

        Read from memory (kept in step with every commit), not from the database,
        unless another process on the file remembers routes too."""
        at = time.time() if now is None else now
        if self._split is None:
            entry = self._routes.get(service_id)
        else:
            entry = await self._writer.call(
                lambda txn: txn.conn.execute(
                    "SELECT origin, expires FROM routes WHERE service_id = ?", (service_id,)
                ).fetchone()
            )
        if entry is None or entry[1] <= at:
            return None
        value: dict[str, Any] = json.loads(entry[0])
        return value

    # --- transports' own key/value rows (gatewayd.store.kv) --------------------------

    async def kv_get(self, transport: str, keys: Iterable[str]) -> dict[str, str]:
        """The unexpired values of ``keys`` in ``transport``'s table (missing ones left out)."""
        wanted = list(dict.fromkeys(keys))
        at = time.time()

        def job(txn: Txn) -> dict[str, str]:
            found: dict[str, str] = {}
            for key in wanted:
                row = txn.conn.execute(
                    "SELECT value FROM kv WHERE transport = ? AND key = ? AND expires > ?",
                    (transport, key, at),
                ).fetchone()
                if row is not None:
                    found[key] = str(row[0])
            return found

        return await self._writer.call(job) if wanted else {}

    async def kv_put(self, transport: str, items: Mapping[str, str], ttl: float) -> None:
        """Set ``items`` in ``transport``'s table, each kept for ``ttl`` seconds; one commit."""
        rows = [(transport, k, v, time.time() + ttl) for k, v in items.items()]

        def job(txn: Txn) -> None:
            txn.conn.executemany(
                "INSERT INTO kv (transport, key, value, expires) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (transport, key) DO UPDATE SET value = excluded.value,"
                " expires = excluded.expires",
                rows,
            )

        if rows:
            await self._writer.call(job)

    async def kv_delete(self, transport: str, keys: Iterable[str]) -> None:
        """Remove ``keys`` from ``transport``'s table (absent ones are fine)."""
        rows = [(transport, k) for k in dict.fromkeys(keys)]

        def job(txn: Txn) -> None:
            txn.conn.executemany("DELETE FROM kv WHERE transport = ? AND key = ?", rows)

        if rows:
            await self._writer.call(job)

    async def learn_device(self, transport: str, device: str, service_id: str) -> bool:
        """Remember a device learned from its first message.

        True if it is new, or its service id changed (either way it needs registering).
        """
        now = time.time()

        def job(txn: Txn) -> bool:
            cursor = txn.conn.execute(
                "INSERT INTO devices (transport, device, service_id, learned)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (transport, device) DO UPDATE"
                " SET service_id = excluded.service_id, learned = excluded.learned"
                " WHERE service_id != excluded.service_id",
                (transport, device, service_id, now),
            )
            return cursor.rowcount > 0

        # An intake call: a full disk refuses the device's message like any other.
        return await self._writer.call(job, intake=True)

    async def forget_device(self, transport: str, device: str) -> None:
        """Forget a learned device (the server refused it): a restart does not reload it."""

        def job(txn: Txn) -> None:
            txn.conn.execute(
                "DELETE FROM devices WHERE transport = ? AND device = ?", (transport, device)
            )

        await self._writer.call(job)

    async def learned_devices(self) -> list[tuple[str, str, str]]:
        """Every learned device as ``(transport, device, service_id)``."""

        def job(txn: Txn) -> list[tuple[str, str, str]]:
            rows = txn.conn.execute(
                "SELECT transport, device, service_id FROM devices ORDER BY transport, device"
            )
            return [(str(t), str(d), str(s)) for t, d, s in rows]

        return await self._writer.call(job)


# --- jobs shared by several methods (they run on the writer thread) ---------------------


def _remember_route(txn: Txn, service_id: str, origin: str, expires: float) -> None:
    txn.routes.append((service_id, origin, expires))
    txn.conn.execute(
        "INSERT INTO routes (service_id, origin, expires) VALUES (?, ?, ?)"
        " ON CONFLICT (service_id) DO UPDATE SET origin = excluded.origin,"
        " expires = excluded.expires",
        (service_id, origin, expires),
    )


def _put_all(
    txn: Txn, queue: Queue, encoded: list[tuple[PutRequest, str]], now: float
) -> list[PutResult]:
    conn = txn.conn
    settings = txn.writer.settings
    results: list[PutResult] = []
    fresh: list[tuple[PutRequest, str, int]] = []
    for request, body in encoded:
        row = conn.execute(
            "SELECT id FROM items WHERE queue = ? AND dedup_key = ?",
            (queue.value, request.dedup_key),
        ).fetchone()
        if row is not None:
            results.append(PutResult(row[0], duplicate=True))
        else:
            size = len(body.encode())
            fresh.append((request, body, size))
            results.append(PutResult(-1, duplicate=False))
    if not fresh:
        return results
    # The limits are checked before anything is written, so a refusal leaves no trace.
    messages = txn.backlog.messages + len(fresh)
    size_total = txn.backlog.bytes + sum(size for _, _, size in fresh)
    if messages > settings.max_messages or size_total > settings.max_bytes:
        detail = (
            f"backlog full: {txn.backlog.messages} messages / {txn.backlog.bytes} bytes stored,"
            f" limits {settings.max_messages} / {settings.max_bytes}"
        )
        txn.writer.refused("backlog", detail)
        raise BacklogFullError(detail, retry_after=RETRY_AFTER_BACKLOG)
    # No savepoint needed: a failing INSERT makes the writer roll the whole transaction
    # back and rerun each job alone, so this job's rows land all together or not at all.
    new_ids = [
        _insert(txn, queue, request, body=body, size=size, now=now) for request, body, size in fresh
    ]
    assigned = iter(new_ids)
    results = [r if r.duplicate else PutResult(next(assigned), duplicate=False) for r in results]
    txn.backlog.messages = messages
    txn.backlog.bytes = size_total
    txn.puts += len(fresh)
    txn.woken.add(queue)
    return results


def _put_part(
    txn: Txn,
    request: PutRequest,
    *,
    body: str,
    into: Queue,
    assemble: Callable[[list[dict[str, Any]]], PutRequest | None],
    now: float,
) -> PartResult:
    conn = txn.conn
    row = conn.execute(
        "SELECT id FROM items WHERE queue = ? AND dedup_key = ?",
        (Queue.SEGMENT.value, request.dedup_key),
    ).fetchone()
    if row is not None:
        return PartResult(row[0], duplicate=True)
    siblings = conn.execute(
        "SELECT id, body, expires_at FROM items WHERE queue = ? AND lane = ?"
        " AND state = 'pending' ORDER BY id",
        (Queue.SEGMENT.value, request.lane),
    ).fetchall()
    # Everything that can refuse runs before the first write: a job's exception is
    # handed to its caller, but the transaction still commits what the job wrote.
    whole = assemble([json.loads(b) for _, b, _ in siblings] + [request.body])
    size = len(body.encode())
    settings = txn.writer.settings
    if (
        txn.backlog.messages + 1 > settings.max_messages
        or txn.backlog.bytes + size > settings.max_bytes
    ):
        detail = (
            f"backlog full: {txn.backlog.messages} messages / {txn.backlog.bytes} bytes stored,"
            f" limits {settings.max_messages} / {settings.max_bytes}"
        )
        txn.writer.refused("backlog", detail)
        raise BacklogFullError(detail, retry_after=RETRY_AFTER_BACKLOG)
    if siblings:
        request = dataclasses.replace(request, expires_at=siblings[0][2])
    part_id = _insert(txn, Queue.SEGMENT, request, body=body, size=size, now=now)
    txn.backlog.messages += 1
    txn.backlog.bytes += size
    txn.puts += 1
    if whole is None:
        return PartResult(part_id, duplicate=False)
    # The whole is not held to the backlog limits: its parts, done below, held the
    # same bytes and more rows, so completing a set never grows the backlog.
    for sibling_id in [*(s[0] for s in siblings), part_id]:
        _finish(txn, sibling_id, State.DONE, None, now)
    row = conn.execute(
        "SELECT id FROM items WHERE queue = ? AND dedup_key = ?", (into.value, whole.dedup_key)
    ).fetchone()
    if row is not None:
        return PartResult(part_id, duplicate=False, whole=PutResult(row[0], duplicate=True))
    whole_body = encode_body(whole.body)
    whole_size = len(whole_body.encode())
    whole_id = _insert(txn, into, whole, body=whole_body, size=whole_size, now=now)
    txn.backlog.messages += 1
    txn.backlog.bytes += whole_size
    txn.puts += 1
    txn.woken.add(into)
    return PartResult(part_id, duplicate=False, whole=PutResult(whole_id, duplicate=False))


def _insert(
    txn: Txn, queue: Queue, request: PutRequest, *, body: str, size: int, now: float
) -> int:
    cursor = txn.conn.execute(
        "INSERT INTO items (queue, msg_id, dedup_key, lane, body, size, created, queued,"
        " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            queue.value,
            request.msg_id,
            request.dedup_key,
            request.lane,
            body,
            size,
            now,
            now,
            request.expires_at,
        ),
    )
    item_id = cursor.lastrowid
    assert item_id is not None  # an INSERT always sets it
    if queue in WORKED:
        item = Item(
            id=item_id,
            queue=queue,
            msg_id=request.msg_id,
            lane=request.lane,
            body=request.body,
            created=now,
            attempts=0,
            not_before=0.0,
            expires_at=request.expires_at,
            last_error=None,
            state=State.PENDING.value,
            size=size,
        )
        txn.changes.append(Change("add", queue.value, item_id, request.lane, item))
    return item_id


def _finished(txn: Txn, queue: str, item_id: int, lane: str) -> None:
    if queue in _WORKED_NAMES:
        txn.changes.append(Change("finish", queue, item_id, lane))


def _snapshot(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every pending item of the worked queues as ``(id, lane, not_before)`` by queue,
    in id order, and the reply routes (under ``_ROUTES``): what the lane index and the
    routes in memory are reloaded from."""
    out: dict[str, list[tuple[Any, ...]]] = {q: [] for q in _WORKED_NAMES}
    out[_ROUTES] = conn.execute("SELECT service_id, origin, expires FROM routes").fetchall()
    rows = conn.execute(
        "SELECT queue, id, lane, not_before FROM items INDEXED BY items_state"
        " WHERE state = 'pending' ORDER BY queue, id"
    )
    for queue, item_id, lane, not_before in rows:
        if queue in out:
            out[queue].append((item_id, lane, not_before))
    return out


def _fetch(txn: Txn, ids: list[int]) -> list[Item]:
    """The pending items among ``ids`` (bodies the lane index does not keep)."""
    found: list[Item] = []
    for start in range(0, len(ids), _FETCH_CHUNK):
        chunk = ids[start : start + _FETCH_CHUNK]
        marks = ",".join("?" * len(chunk))
        rows = txn.conn.execute(
            f"{_SELECT} WHERE id IN ({marks}) AND state = 'pending'",
            chunk,
        )
        found.extend(row_to_item(row) for row in rows)
    return found


def _put_report(txn: Txn, queue: Queue, request: PutRequest, *, now: float) -> None:
    """A failure report stored with the expiry that caused it: it takes the slot the
    expired item freed, so it is not held to the backlog limits."""
    if txn.conn.execute(
        "SELECT 1 FROM items WHERE queue = ? AND dedup_key = ?", (queue.value, request.dedup_key)
    ).fetchone():
        return
    body = encode_body(request.body)
    size = len(body.encode())
    _insert(txn, queue, request, body=body, size=size, now=now)
    txn.backlog.messages += 1
    txn.backlog.bytes += size
    txn.puts += 1
    txn.woken.add(queue)


def _finish(txn: Txn, item_id: int, state: State, reason: str | None, now: float) -> str | None:
    row = txn.conn.execute(
        "SELECT msg_id, size, queue, lane FROM items WHERE id = ? AND state = 'pending'",
        (item_id,),
    ).fetchone()
    if row is None:
        return None  # already finished: done/dead are idempotent
    msg_id, size, queue, lane = row
    _finished(txn, queue, item_id, lane)
    # A done row keeps only its dedup key; a dead one keeps its body for replay.
    body_sql = ", body = NULL" if state == State.DONE else ""
    txn.conn.execute(
        f"UPDATE items SET state = ?, last_error = coalesce(?, last_error), finished = ?{body_sql}"  # noqa: S608
        " WHERE id = ?",
        (state.value, reason, now, item_id),
    )
    txn.backlog.messages -= 1
    txn.backlog.bytes -= size
    return str(msg_id)
