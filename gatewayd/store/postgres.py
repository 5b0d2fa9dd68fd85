"""The shared store: several gatewayd instances on one PostgreSQL database.

Same promises as the SQLite backend (:class:`~gatewayd.store.backend.Store`), across
instances:

- **Group commit.** Every operation is a *job* run inside a transaction. A few
  committer tasks (one per pooled connection) each take every job waiting when they
  are free and run them in one transaction, so concurrent puts share one commit, and a
  put returns only after its commit.
- **One item in flight per lane, cluster-wide.** A lane row (``lanes``) exists while a
  lane has pending items. :meth:`take` leases due lane rows with ``FOR UPDATE SKIP
  LOCKED`` (instances never wait for each other) and hands out each lane's head. The
  lease names this instance and runs out ``lease`` seconds after its last renewal
  (every ``lease / 3``), so the lanes of an instance that died (SIGKILL) are taken over
  by the others within ``lease`` seconds: its items in flight go out again (at least
  once, same msgId).
- **Wake-ups** through LISTEN/NOTIFY: a commit that adds work, or frees a lane, notifies
  ``gatewayd_work`` with the queue's name.

The reasons for leases on lanes rather than locks held across a send, or advisory
locks, are in docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gatewayd.errors import BacklogFullError, GatewaydError, StoreError
from gatewayd.store import queries
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
from gatewayd.store.pg_schema import migrate
from gatewayd.store.pg_statements import (
    WORKED,
    apply_lanes,
    insert_items,
    open_lanes,
    put_report,
    settle_lanes,
    upsert_route,
)
from gatewayd.store.pg_tx import (
    CONNECT_TIMEOUT,
    ROLLBACK_ATTEMPTS,
    WHAT,
    BacklogCount,
    Call,
    Conn,
    Job,
    JobFailed,
    Tx,
    connect_kwargs,
    rolled_back,
    safe_dsn,
    storage_failure,
)
from gatewayd.store.schema import ITEM_COLUMNS, encode_body, row_to_item
from gatewayd.store.writer import RETRY_AFTER_BACKLOG
from gatewayd.tasks import TaskSet

log = structlog.get_logger(__name__)


CHANNEL: Final = "gatewayd_work"
_QUEUES: Final = frozenset(q.value for q in Queue)
_SELECT: Final = f"SELECT {ITEM_COLUMNS} FROM items"
_DB_NOW: Final = "extract(epoch FROM clock_timestamp())"
# A refused intake may come back soon: PostgreSQL restarts in seconds.
RETRY_AFTER_UNAVAILABLE: Final = 5.0
_OWN_CONNECTIONS: Final = 2  # beyond the committers': takes, which run alone
MAX_REJECTED: Final = 10_000  # as the SQLite backend: rejected intake records kept
_PROBE_BYTES: Final = 16 * 1024


class PostgresStore:
    """Durable queues shared by every instance connected to one PostgreSQL database."""

    def __init__(self, settings: StoreSettings, pool: AsyncConnectionPool[Conn]) -> None:
        self.settings = settings
        self._pool = pool
        self._kwargs = connect_kwargs(settings)
        # Unique per process start: a restarted instance does not inherit the leases of
        # the one it replaces (they run out, and anyone may take them).
        self.instance = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self._loop = asyncio.get_running_loop()
        self._tasks = TaskSet()
        self._calls: list[Call] = []
        self._work = asyncio.Event()
        # Delivered items whose done is not committed yet (it rides the next transaction):
        # their lanes are still held, and not handed out again by this instance.
        self._unwritten: dict[int, Item] = {}
        self._dones_queued = False
        self._count = BacklogCount()
        self._cap: int | None = None  # limit_size(): a rehearsal of a full disk
        self._episode: str | None = None
        self.commits = 0
        self.rows_put = 0
        self._claimed: dict[int, tuple[str, str]] = {}  # id -> (queue, lane), leased by us
        self._wakeups: dict[Queue, asyncio.Event] = {q: asyncio.Event() for q in Queue}
        self._generation: dict[Queue, int] = dict.fromkeys(Queue, 0)
        self._seen: dict[Queue, int] = dict.fromkeys(Queue, 0)
        self._closed = False
        self._listening: asyncio.Future[None] = self._loop.create_future()

    # --- life ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: StoreSettings) -> PostgresStore:
        """Connect, migrate the schema (under a lock) and start the committers, the
        listener and the lease renewal."""
        if not settings.dsn:
            raise StoreError("store.dsn is required with backend = postgresql")
        kwargs = connect_kwargs(settings)
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            settings.dsn,
            kwargs=kwargs,
            min_size=1,
            max_size=settings.pool_size + _OWN_CONNECTIONS,
            open=False,
            timeout=CONNECT_TIMEOUT,
            name="gatewayd-store",
        )
        try:
            # One connection first: its failure says why (refused, wrong password, no
            # such database), where a pool would only report that it timed out.
            async with await psycopg.AsyncConnection.connect(settings.dsn, **kwargs) as conn:
                version = await migrate(conn)
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT * 2)
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            await pool.close()
            where = safe_dsn(settings.dsn)
            raise StoreError(f"cannot open the PostgreSQL store at {where}: {exc}") from None
        except BaseException:
            await pool.close()
            raise
        store = cls(settings, pool)
        for n in range(settings.pool_size):
            store._tasks.spawn(f"store:committer-{n}", store._committer())
        store._tasks.spawn("store:listen", store._listen())
        store._tasks.spawn("store:lease", store._renew_leases())
        try:  # wake-ups from other instances flow before the first take
            await asyncio.wait_for(asyncio.shield(store._listening), CONNECT_TIMEOUT * 2)
        except BaseException:
            await store._tasks.aclose()
            await pool.close()
            raise
        log.info(
            "store.opened",
            backend="postgresql",
            database=safe_dsn(settings.dsn),
            schema=version,
            instance=store.instance,
            lease=settings.lease,
            max_messages=settings.max_messages,
            max_bytes=settings.max_bytes,
        )
        return store

    async def close(self) -> None:
        """Run what is queued, give up this instance's leases (the others take those
        lanes at once, not after ``lease``), stop the tasks and close the pool."""
        if self._closed:
            return
        with contextlib.suppress(GatewaydError):
            await self._call(self._release_all)
        self._closed = True
        await self._tasks.aclose()
        await self._pool.close()
        log.info("store.closed", backend="postgresql", database=safe_dsn(self.settings.dsn or ""))

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def refusing(self) -> str | None:
        return self._episode

    # --- the committers --------------------------------------------------------------------

    def _call(self, fn: Job, *, intake: bool = False) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        if self._closed:
            future.set_exception(StoreError("the store is closed"))
            return future
        self._calls.append(Call(fn, future, intake))
        self._work.set()
        return future

    async def _alone(self, fn: Job) -> Any:
        """Run one job in a transaction of its own, now, beside the committers."""
        call = Call(fn, self._loop.create_future(), False)
        if self._closed:
            raise StoreError("the store is closed")
        await self._run_alone(call)
        return await call.future

    async def _committer(self) -> None:
        while True:
            await self._work.wait()
            if not self._calls:
                self._work.clear()
                continue
            batch = self._calls[: self.settings.batch_max]
            del self._calls[: self.settings.batch_max]
            if not self._calls:
                self._work.clear()
            await self._run(batch)

    async def _run(self, batch: list[Call]) -> None:
        """One transaction for the batch. A job that raises is rolled back with the
        rest; it then runs alone (its error goes to its caller) and the others again
        together, so one refusal never costs the jobs that shared its transaction."""
        if not batch:
            return
        try:
            outcomes, tx = await self._transaction(batch)
        except JobFailed as failed:
            if len(batch) == 1:
                self._fail(failed.call, failed.error)
                return
            await self._run(failed.others)
            await self._run_alone(failed.call)
            return
        except Exception as exc:
            for call in batch:
                self._fail(call, exc)
            return
        self._committed(tx)
        for call, outcome in outcomes:
            if not call.future.done():
                call.future.set_result(outcome)

    async def _run_alone(self, call: Call) -> None:
        try:
            outcomes, tx = await self._transaction([call])
        except JobFailed as failed:
            self._fail(call, failed.error)
            return
        except Exception as exc:
            self._fail(call, exc)
            return
        self._committed(tx)
        if not call.future.done():
            call.future.set_result(outcomes[0][1])

    async def _transaction(self, batch: list[Call]) -> tuple[list[tuple[Call, Any]], Tx]:
        """Run the batch in one transaction; one the database rolled back to break a
        deadlock or a serialization conflict is run again, whole, a few times."""
        for attempt in range(1, ROLLBACK_ATTEMPTS + 1):
            try:
                return await self._attempt(batch)
            except (JobFailed, psycopg.Error) as exc:
                cause = exc.error if isinstance(exc, JobFailed) else exc
                if attempt == ROLLBACK_ATTEMPTS or not rolled_back(cause):
                    raise
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def _attempt(self, batch: list[Call]) -> tuple[list[tuple[Call, Any]], Tx]:
        async with self._pool.connection() as conn:
            tx = Tx(conn, self._count)
            outcomes: list[tuple[Call, Any]] = []
            async with conn.transaction():
                for call in batch:
                    try:
                        outcomes.append((call, await call.fn(tx)))
                    except Exception as exc:
                        if storage_failure(exc) is not None:
                            raise  # the database, not the job: every job shares it
                        raise JobFailed(call, exc, [c for c in batch if c is not call]) from exc
                await apply_lanes(tx)
                if tx.woken:
                    await conn.execute(
                        "SELECT pg_notify(%s, q || ' ' || %s) FROM unnest(%s::text[]) AS q",
                        (CHANNEL, self.instance, sorted(tx.woken)),
                    )
        return outcomes, tx

    def _committed(self, tx: Tx) -> None:
        self.commits += 1
        self.rows_put += tx.puts
        if tx.recounted is not None:
            self._count.messages, self._count.bytes = tx.recounted
            self._count.at = time.monotonic()
        self._count.messages += tx.messages
        self._count.bytes += tx.bytes
        if self._episode is not None and (tx.puts or tx.proven):
            log.info("store.recovered", cause=self._episode)
            self._episode = None
        for queue in tx.woken:
            self._wake(Queue(queue))

    def _fail(self, call: Call, exc: BaseException) -> None:
        if call.future.done():
            return
        kind = storage_failure(exc)
        if kind is None:
            error: BaseException = exc
            if not isinstance(exc, GatewaydError):
                log.error("store.error", error=str(exc), database=safe_dsn(self.settings.dsn or ""))
                error = StoreError(f"store failure: {exc}")
            call.future.set_exception(error)
            return
        detail = f"the database {WHAT[kind]}: {str(exc).strip() or type(exc).__name__}"
        if call.intake:
            self._refused(kind, detail)
            retry = RETRY_AFTER_UNAVAILABLE if kind == "unavailable" else RETRY_AFTER_BACKLOG
            call.future.set_exception(BacklogFullError(detail, retry_after=retry))
        else:
            call.future.set_exception(StoreError(detail))

    def _refused(self, kind: str, detail: str) -> None:
        if self._episode == kind:
            return
        self._episode = kind
        event = "store.readonly" if kind == "readonly" else "store.full"
        log.error(event, cause=kind, detail=detail, database=safe_dsn(self.settings.dsn or ""))

    # --- wake-ups --------------------------------------------------------------------------

    def _wake(self, queue: Queue) -> None:
        self._generation[queue] += 1
        self._wakeups[queue].set()
        self._wakeups[queue] = asyncio.Event()

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        if self._generation[queue] != self._seen[queue]:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeups[queue].wait(), timeout)

    async def _listen(self) -> None:
        """LISTEN on its own connection (notifications need one held open), wake the
        waiters of the queue each names, and come back after a lost connection."""
        delay = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.settings.dsn or "", autocommit=True, **self._kwargs
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}".encode())
                    delay = 0.5
                    for queue in Queue:  # anything may have happened while we were away
                        self._wake(queue)
                    if not self._listening.done():
                        self._listening.set_result(None)
                    async for note in conn.notifies():
                        # "<queue> <instance>": our own commits woke our waiters already.
                        name, _, sender = note.payload.partition(" ")
                        if sender != self.instance and name in _QUEUES:
                            self._wake(Queue(name))
            except (psycopg.Error, OSError) as exc:
                log.warning("store.listen_lost", error=str(exc).strip(), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _renew_leases(self) -> None:
        """Keep this instance's lanes: every ``lease / 3`` seconds, push their leases on."""
        while True:
            await asyncio.sleep(self.settings.lease / 3)
            self._flush_dones()  # dones a failed transaction left
            if not self._claimed and not self._unwritten:
                continue
            try:
                await self._call(self._renew)
            except GatewaydError as exc:
                log.warning("store.lease_renewal_failed", error=str(exc))

    async def _renew(self, tx: Tx) -> None:
        # Locked in key order, as every transaction takes lane rows (no deadlocks).
        await tx.run(
            f"UPDATE lanes AS l SET lease_until = {_DB_NOW} + %s FROM (SELECT queue, lane"
            " FROM lanes WHERE owner = %s ORDER BY queue, lane FOR UPDATE) AS mine"
            " WHERE l.queue = mine.queue AND l.lane = mine.lane AND l.owner = %s",
            (self.settings.lease, self.instance, self.instance),
        )

    async def _release_all(self, tx: Tx) -> None:
        await self._finish_dones(tx)
        mine = await tx.all(
            "SELECT queue, lane FROM lanes WHERE owner = %s ORDER BY queue, lane", (self.instance,)
        )
        settle_lanes(tx, [(str(q), str(lane)) for q, lane in mine])
        self._claimed.clear()

    # --- intake ----------------------------------------------------------------------------

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
        request = PutRequest(
            msg_id=msg_id, dedup_key=dedup_key, lane=lane, body=body, expires_at=expires_at
        )
        (result,) = await self.put_many(queue, [request])
        return result

    async def put_many(
        self, queue: Queue, requests: Sequence[PutRequest], *, route: Route | None = None
    ) -> list[PutResult]:
        now = time.time()

        async def store(encoded: list[tuple[PutRequest, str]]) -> list[PutResult]:
            async def job(tx: Tx) -> list[PutResult]:
                results = await self._put_all(tx, queue, encoded, now)
                if route is not None:
                    origin = encode_body(route.origin)
                    await upsert_route(tx, route.service_id, origin, now + route.ttl)
                return results

            return await self._call(job, intake=True)  # type: ignore[no-any-return]

        return await queries.put_each_once(queue, requests, store)

    async def _put_all(
        self, tx: Tx, queue: Queue, encoded: list[tuple[PutRequest, str]], now: float
    ) -> list[PutResult]:
        rows = [(r, body, len(body.encode())) for r, body in encoded]
        if await self._fits(tx, len(rows), sum(size for _, _, size in rows)):
            # The usual case, in one statement: whatever is a duplicate is skipped.
            ids = await insert_items(tx, queue, rows, now, skip_stored=True)
            missing = [r.dedup_key for r, _, _ in rows if r.dedup_key not in ids]
            existing = await self._stored(tx, queue, missing) if missing else {}
        else:
            # Near a limit: only what is new counts against it, so look first.
            existing = await self._stored(tx, queue, [r.dedup_key for r, _, _ in rows])
            fresh = [row for row in rows if row[0].dedup_key not in existing]
            ids = {}
            if fresh:
                await self._check_limits(tx, len(fresh), sum(size for _, _, size in fresh))
                ids = await insert_items(tx, queue, fresh, now)
        return [
            PutResult(existing[r.dedup_key], duplicate=True)
            if r.dedup_key in existing
            else PutResult(ids[r.dedup_key], duplicate=False)
            for r, _, _ in rows
        ]

    @staticmethod
    async def _stored(tx: Tx, queue: Queue, keys: list[str]) -> dict[str, int]:
        rows = await tx.all(
            "SELECT dedup_key, id FROM items WHERE queue = %s AND dedup_key = ANY(%s)",
            (queue.value, keys),
        )
        return {str(key): int(item_id) for key, item_id in rows}

    async def _fits(self, tx: Tx, messages: int, size: int) -> bool:
        held, held_bytes = await tx.backlog()
        return (
            self._cap is None
            and held + messages <= self.settings.max_messages
            and held_bytes + size <= self.settings.max_bytes
        )

    async def _check_limits(self, tx: Tx, messages: int, size: int) -> None:
        held, held_bytes = await tx.backlog()
        settings = self.settings
        if held + messages > settings.max_messages or held_bytes + size > settings.max_bytes:
            detail = (
                f"backlog full: {held} messages / {held_bytes} bytes stored,"
                f" limits {settings.max_messages} / {settings.max_bytes}"
            )
            self._refused("backlog", detail)
            raise BacklogFullError(detail, retry_after=RETRY_AFTER_BACKLOG)
        if self._cap is not None:
            (used,) = await tx.one("SELECT pg_database_size(current_database())")
            if int(used) + size > self._cap:
                raise pg_errors.DiskFull("could not extend file: the store's size cap is reached")

    async def put_part(
        self,
        request: PutRequest,
        *,
        into: Queue,
        assemble: Callable[[list[dict[str, Any]]], PutRequest | None],
    ) -> PartResult:
        body = encode_body(request.body)
        now = time.time()

        async def job(tx: Tx) -> PartResult:
            row = await tx.maybe(
                "SELECT id FROM items WHERE queue = %s AND dedup_key = %s",
                (Queue.SEGMENT.value, request.dedup_key),
            )
            if row is not None:
                return PartResult(int(row[0]), duplicate=True)
            # Two parts of one set arriving at two instances at once must not both see
            # the other missing: one set is assembled by one transaction at a time.
            await tx.run("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"segment:{request.lane}",))
            siblings = await tx.all(
                "SELECT id, body, expires_at FROM items WHERE queue = %s AND lane = %s"
                " AND state = 'pending' ORDER BY id",
                (Queue.SEGMENT.value, request.lane),
            )
            whole = assemble([json.loads(b) for _, b, _ in siblings] + [request.body])
            size = len(body.encode())
            await self._check_limits(tx, 1, size)
            part = request
            if siblings:
                part = dataclasses.replace(request, expires_at=siblings[0][2])
            part_id = (await insert_items(tx, Queue.SEGMENT, [(part, body, size)], now))[
                part.dedup_key
            ]
            if whole is None:
                return PartResult(part_id, duplicate=False)
            await self._finish(tx, [*(int(s[0]) for s in siblings), part_id], State.DONE, None, now)
            row = await tx.maybe(
                "SELECT id FROM items WHERE queue = %s AND dedup_key = %s",
                (into.value, whole.dedup_key),
            )
            if row is not None:
                return PartResult(
                    part_id, duplicate=False, whole=PutResult(int(row[0]), duplicate=True)
                )
            whole_body = encode_body(whole.body)
            whole_id = (
                await insert_items(tx, into, [(whole, whole_body, len(whole_body.encode()))], now)
            )[whole.dedup_key]
            return PartResult(part_id, duplicate=False, whole=PutResult(whole_id, duplicate=False))

        result: PartResult = await self._call(job, intake=True)
        if result.duplicate:
            log.debug("store.duplicate", msg_id=request.msg_id, queue=Queue.SEGMENT.value)
        return result

    async def put_rejected(
        self, *, msg_id: str, dedup_key: str, lane: str, reason: str, body: dict[str, Any]
    ) -> str:
        encoded = encode_body(body)
        now = time.time()

        async def job(tx: Tx) -> str:
            (kept,) = await tx.one(
                "SELECT count(*) FROM items WHERE state = 'dead' AND queue = 'intake'"
            )
            if int(kept) >= MAX_REJECTED:
                return "dlq_full"
            stored = await tx.run(
                "INSERT INTO items (queue, msg_id, dedup_key, lane, body, size, created, queued,"
                " state, last_error, finished) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'dead',"
                " %s, %s) ON CONFLICT (queue, dedup_key) DO NOTHING",
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
            if stored:
                tx.proven = True
            return "stored" if stored else "duplicate"

        return str(await self._call(job, intake=True))

    # --- the sender's side -----------------------------------------------------------------

    async def take(self, queue: Queue, *, limit: int, now: float | None = None) -> list[Item]:
        """Lease up to ``limit`` due lanes of ``queue`` (free, or whose holder's lease ran
        out) and hand out their heads, oldest lane first."""
        at = time.time() if now is None else now
        self._seen[queue] = self._generation[queue]
        taken: list[tuple[str, str]] = []

        # Lanes this instance holds and is not sending or settling (a send cancelled, its
        # release not committed yet) are its to hand out again.
        busy = [lane for q, lane in self._claimed.values() if q == queue.value]
        busy += [i.lane for i in self._unwritten.values() if i.queue == queue]

        async def job(tx: Tx) -> list[Item]:
            leased = await tx.all(
                "WITH picked AS (SELECT queue, lane, owner FROM lanes"
                " WHERE queue = %(q)s AND ready_at <= %(at)s"
                f" AND (owner IS NULL OR lease_until < {_DB_NOW}"
                " OR (owner = %(me)s AND NOT lane = ANY(%(busy)s)))"
                " ORDER BY head LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                f" UPDATE lanes AS l SET owner = %(me)s, lease_until = {_DB_NOW} + %(lease)s"
                " FROM picked WHERE l.queue = picked.queue AND l.lane = picked.lane"
                " RETURNING l.lane, picked.owner",
                {
                    "q": queue.value,
                    "at": at,
                    "limit": limit,
                    "me": self.instance,
                    "lease": self.settings.lease,
                    "busy": busy,
                },
            )
            taken.clear()  # a job may run twice (batch, then alone)
            taken.extend(
                (str(lane), str(prev))
                for lane, prev in leased
                if prev is not None and prev != self.instance
            )
            if not leased:
                return []
            rows = await tx.all(
                f"SELECT DISTINCT ON (lane) {ITEM_COLUMNS} FROM items"
                " WHERE queue = %s AND lane = ANY(%s) AND state = 'pending' ORDER BY lane, id",
                (queue.value, [lane for lane, _ in leased]),
            )
            items = [row_to_item(row) for row in rows]
            ready = [item for item in items if item.not_before <= at]
            held = {item.lane for item in ready}
            idle = [lane for lane, _ in leased if lane not in held]
            if idle:  # no head due after all (a retry read late): give those lanes back
                settle_lanes(tx, [(queue.value, lane) for lane in idle])
            return sorted(ready, key=lambda i: i.id)

        # Alone, not in a batch: a take's locks are taken with SKIP LOCKED and never wait,
        # so its transaction can never be part of a deadlock (docs/scaling.md).
        items: list[Item] = await self._alone(job)
        for lane, previous in taken:
            log.warning("store.lane_taken_over", queue=str(queue), lane=lane, previous=previous)
        for item in items:
            self._claimed[item.id] = (queue.value, item.lane)
        return items

    async def done(self, item_id: int) -> None:
        """Delivered, waiting for the commit."""
        self._claimed.pop(item_id, None)
        now = time.time()

        async def job(tx: Tx) -> None:
            await self._finish(tx, [item_id], State.DONE, None, now)

        await self._call(job)

    def done_soon(self, item: Item) -> None:
        """Delivered, without waiting: the write goes with the next transaction, at once
        (not held back to ride with others as in SQLite: here the lane stays held, for
        every instance, until it commits). A crash before that sends the item again."""
        self._claimed.pop(item.id, None)
        self._unwritten[item.id] = item
        self._flush_dones()

    def _flush_dones(self) -> None:
        if self._dones_queued or not self._unwritten:
            return
        self._dones_queued = True
        self._call(self._finish_dones).add_done_callback(self._dones_written)

    def _dones_written(self, future: asyncio.Future[Any]) -> None:
        self._dones_queued = False
        if future.cancelled() or future.exception() is not None:
            # Still pending in the database; tried again with the next done, or by the
            # lease renewal (not at once: the database may be away).
            log_settle_failure(future)
            return
        for item_id in future.result():
            self._unwritten.pop(item_id, None)
        self._flush_dones()  # those delivered meanwhile

    async def _finish_dones(self, tx: Tx) -> list[int]:
        ids = list(self._unwritten)
        if ids:
            await self._finish(tx, ids, State.DONE, None, time.time())
        return ids

    def release(self, item_id: int) -> None:
        """A send that was cancelled: its lane stays leased to this instance, which hands
        the head out again at its next take (no write; a clean close gives the lease
        back, a crash lets it run out)."""
        claim = self._claimed.pop(item_id, None)
        if claim is not None:
            self._wake(Queue(claim[0]))

    async def retry_later(self, item_id: int, *, not_before: float, error: str) -> None:
        self._claimed.pop(item_id, None)

        async def job(tx: Tx) -> None:
            row = await tx.maybe(
                "UPDATE items SET attempts = attempts + 1, not_before = %s, last_error = %s"
                " WHERE id = %s AND state = 'pending' RETURNING queue, lane",
                (not_before, error, item_id),
            )
            if row is not None and row[0] in WORKED:
                settle_lanes(tx, [(str(row[0]), str(row[1]))])

        await self._call(job)

    async def dead(self, item_id: int, *, reason: str) -> None:
        self._claimed.pop(item_id, None)
        now = time.time()

        async def job(tx: Tx) -> list[str]:
            return await self._finish(tx, [item_id], State.DEAD, reason, now)

        for msg_id in await self._call(job):
            log.warning("store.dead", msg_id=msg_id, id=item_id, reason=reason)

    async def _finish(
        self, tx: Tx, ids: list[int], state: State, reason: str | None, now: float
    ) -> list[str]:
        """Settle pending items (idempotent), free their lanes; return their msgIds."""
        rows = await tx.all(
            "UPDATE items SET state = %s, last_error = coalesce(%s, last_error), finished = %s,"
            " body = CASE WHEN %s THEN NULL ELSE body END"
            " WHERE id = ANY(%s) AND state = 'pending' RETURNING msg_id, size, queue, lane",
            (state.value, reason, now, state == State.DONE, ids),
        )
        tx.messages -= len(rows)
        tx.bytes -= sum(int(r[1]) for r in rows)
        lanes = sorted({(str(r[2]), str(r[3])) for r in rows if r[2] in WORKED})
        if lanes:
            settle_lanes(tx, lanes)
        return [str(r[0]) for r in rows]

    async def expire(
        self,
        now: float | None = None,
        *,
        report: Callable[[Item], tuple[Queue, PutRequest] | None] | None = None,
    ) -> list[Item]:
        at = time.time() if now is None else now
        oldest = at - self.settings.max_age
        claimed = set(self._claimed)
        unreportable: list[tuple[Item, str]] = []

        async def job(tx: Tx) -> list[Item]:
            unreportable.clear()  # a job may run twice (batch, then alone)
            rows = await tx.all(
                f"{_SELECT} WHERE state = 'pending' AND expires_at <= %s"
                f" UNION {_SELECT} WHERE state = 'pending' AND queued <= %s ORDER BY id",
                (at, oldest),
            )
            found = [row_to_item(row) for row in rows if row[0] not in claimed]
            if not found:
                return []
            # Lanes being sent by a live instance keep their items for that send to
            # decide; the rest are locked so no instance takes them meanwhile.
            worked = sorted({(i.queue.value, i.lane) for i in found if i.queue.value in WORKED})
            free = set()
            if worked:
                free = {
                    (str(q), str(lane))
                    for q, lane in await tx.all(
                        "SELECT queue, lane FROM lanes WHERE (queue, lane) IN"
                        " (SELECT * FROM unnest(%s::text[], %s::text[]))"
                        f" AND (owner IS NULL OR lease_until < {_DB_NOW})"
                        " ORDER BY queue, lane FOR UPDATE SKIP LOCKED",
                        ([q for q, _ in worked], [lane for _, lane in worked]),
                    )
                }
            expired: list[Item] = []
            for item in found:
                if item.queue.value in WORKED and (item.queue.value, item.lane) not in free:
                    continue
                reason = queries.expiry_reason(item, at)
                if not await self._finish(tx, [item.id], State.DEAD, reason, at):
                    continue
                expired.append(queries.as_expired(item, reason, at))
                built = queries.failure_report(item, report, unreportable)
                if built is not None:
                    await put_report(tx, *built, now=at)
            return expired

        expired: list[Item] = await self._call(job)
        queries.log_expired(expired, unreportable)
        return expired

    # --- inspection and the DLQ ------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        now = time.time()

        async def job(tx: Tx) -> dict[str, Any]:
            rows = await tx.all(queries.COUNTS_SQL)
            queues = queries.queue_counts(rows, now)
            pending = sum(int(r[2]) for r in rows if r[1] == State.PENDING)
            pending_bytes = sum(int(r[3]) for r in rows if r[1] == State.PENDING)
            (db_bytes,) = await tx.one("SELECT pg_database_size(current_database())")
            tx.recounted = (pending - tx.messages, pending_bytes - tx.bytes)
            return {
                "queues": queues,
                "db_bytes": int(db_bytes),
                "backlog": {
                    "messages": pending,
                    "bytes": pending_bytes,
                    "max_messages": self.settings.max_messages,
                    "max_bytes": self.settings.max_bytes,
                },
                "commits": self.commits,
                "rows_put": self.rows_put,
                "path": safe_dsn(self.settings.dsn or ""),
                "backend": "postgresql",
                "instance": self.instance,
            }

        result: dict[str, Any] = await self._call(job)
        return result

    async def list_items(
        self, *, queue: Queue | None, state: str | None, limit: int, after: int = 0
    ) -> list[Item]:
        where, params = queries.list_filter(queue=queue, state=state, after=after, mark="%s")
        sql = f"{_SELECT} WHERE {where} ORDER BY id LIMIT %s"
        params.append(limit)

        async def job(tx: Tx) -> list[Item]:
            return [row_to_item(row) for row in await tx.all(sql, params)]

        items: list[Item] = await self._call(job)
        return items

    async def get(self, item_id: int) -> Item | None:
        async def job(tx: Tx) -> Item | None:
            row = await tx.maybe(f"{_SELECT} WHERE id = %s", (item_id,))
            return None if row is None else row_to_item(row)

        item: Item | None = await self._call(job)
        return item

    async def replay(self, item_id: int) -> bool:
        now = time.time()

        async def job(tx: Tx) -> str | None:
            row = await tx.maybe(
                "UPDATE items SET state = 'pending', attempts = 0, not_before = 0,"
                " expires_at = NULL, last_error = NULL, finished = NULL, queued = %s"
                " WHERE id = %s AND state = 'dead' AND queue != 'intake'"
                " RETURNING msg_id, queue, lane, size",
                (now, item_id),
            )
            if row is None:
                return None
            msg_id, queue, lane, size = row
            tx.messages += 1
            tx.bytes += int(size)
            if queue in WORKED:
                open_lanes(tx, str(queue), [(str(lane), item_id)])
            else:
                tx.woken.add(str(queue))
            return str(msg_id)

        msg_id = await self._call(job)
        if msg_id is None:
            return False
        log.info("store.replayed", msg_id=msg_id, id=item_id)
        return True

    async def purge(
        self, *, queue: Queue | None, state: str = "dead", older_than: float | None = None
    ) -> int:
        where, params = queries.purge_filter(
            queue=queue, state=state, older_than=older_than, mark="%s"
        )

        async def job(tx: Tx) -> int:
            rows = await tx.all(
                f"DELETE FROM items WHERE {where} RETURNING queue, lane, size",
                params,
            )
            if state == State.PENDING:
                tx.messages -= len(rows)
                tx.bytes -= sum(int(r[2]) for r in rows)
                lanes = sorted({(str(q), str(lane)) for q, lane, _ in rows if q in WORKED})
                if lanes:
                    settle_lanes(tx, lanes)
            return len(rows)

        count: int = await self._call(job)
        log.info("store.purged", count=count, state=state, queue=queue and str(queue))
        return count

    async def probe(self) -> None:
        async def job(tx: Tx) -> None:
            await tx.run(
                "INSERT INTO kv (transport, key, value, expires) VALUES ('', 'probe', %s, 0)"
                " ON CONFLICT (transport, key) DO UPDATE SET value = excluded.value",
                ("x" * _PROBE_BYTES,),
            )
            await tx.run("DELETE FROM kv WHERE transport = '' AND key = 'probe'")
            if self._cap is not None:
                await self._check_limits(tx, 0, _PROBE_BYTES)
            tx.proven = True

        await self._call(job, intake=True)

    async def prune(self, now: float | None = None) -> int:
        at = time.time() if now is None else now

        async def job(tx: Tx) -> int:
            await tx.run("DELETE FROM routes WHERE expires <= %s", (at,))
            await tx.run("DELETE FROM kv WHERE expires <= %s", (at,))
            return await tx.run(
                "DELETE FROM items WHERE state = 'done' AND finished <= %s",
                (at - self.settings.dedup_window,),
            )

        tombstones: int = await self._call(job)
        return tombstones

    async def limit_size(self, max_bytes: int | None) -> None:
        """Refuse writes that would grow the database past ``max_bytes``, as a full disk
        would (PostgreSQL has no per-database size cap: checked on each intake)."""
        self._cap = max_bytes

    # --- reply routes, transports' key/value rows, learned devices ---------------------

    async def remember_route(self, service_id: str, origin: dict[str, Any], ttl: float) -> None:
        expires = time.time() + ttl
        encoded = encode_body(origin)

        async def job(tx: Tx) -> None:
            await upsert_route(tx, service_id, encoded, expires)

        await self._call(job)

    async def route(self, service_id: str, now: float | None = None) -> dict[str, Any] | None:
        at = time.time() if now is None else now

        async def job(tx: Tx) -> str | None:
            row = await tx.maybe(
                "SELECT origin FROM routes WHERE service_id = %s AND expires > %s",
                (service_id, at),
            )
            return None if row is None else str(row[0])

        # On the intake path (a message without a destination): the database away
        # refuses intake (503, Retry-After) like a put would, not a 500.
        found = await self._call(job, intake=True)
        if found is None:
            return None
        value: dict[str, Any] = json.loads(found)
        return value

    async def kv_get(self, transport: str, keys: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        at = time.time()

        async def job(tx: Tx) -> dict[str, str]:
            rows = await tx.all(
                "SELECT key, value FROM kv WHERE transport = %s AND key = ANY(%s) AND expires > %s",
                (transport, wanted, at),
            )
            return {str(k): str(v) for k, v in rows}

        found: dict[str, str] = await self._call(job)
        return found

    async def kv_put(self, transport: str, items: Mapping[str, str], ttl: float) -> None:
        if not items:
            return
        expires = time.time() + ttl
        keys, values = list(items), list(items.values())

        async def job(tx: Tx) -> None:
            await tx.run(
                "INSERT INTO kv (transport, key, value, expires)"
                " SELECT %s, k, v, %s FROM unnest(%s::text[], %s::text[]) AS t(k, v)"
                " ON CONFLICT (transport, key) DO UPDATE SET value = excluded.value,"
                " expires = excluded.expires",
                (transport, expires, keys, values),
            )

        await self._call(job)

    async def kv_delete(self, transport: str, keys: Iterable[str]) -> None:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return

        async def job(tx: Tx) -> None:
            await tx.run(
                "DELETE FROM kv WHERE transport = %s AND key = ANY(%s)", (transport, wanted)
            )

        await self._call(job)

    async def learn_device(self, transport: str, device: str, service_id: str) -> bool:
        now = time.time()

        async def job(tx: Tx) -> bool:
            changed = await tx.run(
                "INSERT INTO devices (transport, device, service_id, learned)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (transport, device) DO UPDATE"
                " SET service_id = excluded.service_id, learned = excluded.learned"
                " WHERE devices.service_id != excluded.service_id",
                (transport, device, service_id, now),
            )
            return changed > 0

        learned: bool = await self._call(job, intake=True)
        return learned

    async def forget_device(self, transport: str, device: str) -> None:
        async def job(tx: Tx) -> None:
            await tx.run(
                "DELETE FROM devices WHERE transport = %s AND device = %s", (transport, device)
            )

        await self._call(job)

    async def learned_devices(self) -> list[tuple[str, str, str]]:
        async def job(tx: Tx) -> list[tuple[str, str, str]]:
            rows = await tx.all(
                "SELECT transport, device, service_id FROM devices ORDER BY transport, device"
            )
            return [(str(t), str(d), str(s)) for t, d, s in rows]

        devices: list[tuple[str, str, str]] = await self._call(job)
        return devices


def log_settle_failure(future: asyncio.Future[Any]) -> None:
    if future.cancelled() or future.exception() is None:
        return
    # Still pending in the database, its lane held until the lease runs out: it goes
    # out again then (at least once).
    log.error("store.settle_failed", error=str(future.exception()))
