"""The shared store's transactions: what a job sees, how jobs are batched and retried,
and which database failures refuse intake (:mod:`gatewayd.store.postgres`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from gatewayd.store import pg_text
from gatewayd.store.model import StoreSettings

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
# The backlog count (pending rows, their bytes) is read again at most this often: the
# limits hold across instances within what the others accepted meanwhile.
RECOUNT_SECONDS: Final = 1.0
ROLLBACK_ATTEMPTS: Final = 3  # runs of a transaction the database rolled back
CONNECT_TIMEOUT: Final = 5.0  # seconds: a database that does not answer refuses intake


@dataclass(slots=True)
class BacklogCount:
    """The shared backlog as this instance last counted it, plus its own puts since."""

    messages: int = 0
    bytes: int = 0
    at: float = float("-inf")  # time.monotonic() of the count


@dataclass(slots=True)
class Tx:
    """What a job sees: the connection inside the open transaction, and its bookkeeping
    (applied to the store only if the transaction commits)."""

    conn: Conn
    count: BacklogCount
    messages: int = 0  # backlog deltas
    bytes: int = 0
    recounted: tuple[int, int] | None = None
    woken: set[str] = field(default_factory=set)  # queues to notify after the commit
    opened: dict[tuple[str, str], int] = field(default_factory=dict)  # lane -> new head
    settled: set[tuple[str, str]] = field(default_factory=set)  # lanes to free
    puts: int = 0
    proven: bool = False

    async def backlog(self) -> tuple[int, int]:
        """Pending rows and bytes over all queues, this transaction's own puts included."""
        if self.recounted is None and time.monotonic() - self.count.at > RECOUNT_SECONDS:
            row = await self.one(
                "SELECT count(*), coalesce(sum(size), 0) FROM items WHERE state = 'pending'"
            )
            # The count sees this transaction's own changes so far: keep it as the base
            # they apply to, so they are not counted twice.
            self.recounted = (int(row[0]) - self.messages, int(row[1]) - self.bytes)
        base = self.recounted or (self.count.messages, self.count.bytes)
        return base[0] + self.messages, base[1] + self.bytes

    async def one(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> tuple[Any, ...]:
        row = await (await self.conn.execute(sql.encode(), params)).fetchone()
        assert row is not None  # an aggregate or RETURNING that always yields a row
        return row

    async def maybe(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> tuple[Any, ...] | None:
        return await (await self.conn.execute(sql.encode(), params)).fetchone()

    async def all(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        return await (await self.conn.execute(sql.encode(), params)).fetchall()

    async def run(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        return (await self.conn.execute(sql.encode(), params)).rowcount


Job = Callable[[Tx], Awaitable[Any]]


@dataclass(slots=True)
class Call:
    fn: Job
    future: asyncio.Future[Any]
    intake: bool


class JobFailed(Exception):
    """A job raised inside a batch: the batch is rolled back and retried without it."""

    def __init__(self, call: Call, error: Exception, others: list[Call]) -> None:
        super().__init__(str(error))
        self.call = call
        self.error = error
        self.others = others


WHAT: Final = {
    "unavailable": "is unreachable",
    "disk": "is out of disk space",
    "readonly": "is read-only",
}


def rolled_back(exc: BaseException) -> bool:
    """The database rolled the transaction back to break a deadlock or a serialization
    conflict (SQLSTATE class 40): running it again is the cure."""
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("40")


def storage_failure(exc: BaseException) -> str | None:
    """A failure of the database itself refuses intake; anything else (a deadlock, a
    constraint, a bug) is the job's own."""
    if isinstance(exc, pg_errors.DiskFull):
        return "disk"
    if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
        return "readonly"
    if isinstance(exc, PoolTimeout | OSError):
        return "unavailable"
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        # No SQLSTATE: the connection broke; 08: connection exceptions; 57P0x: the
        # server is shutting down or starting; 53: out of resources.
        if not state or state.startswith(("08", "57P", "53")):
            return "unavailable"
    return None


def connect_kwargs(settings: StoreSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "connect_timeout": int(CONNECT_TIMEOUT),
        "application_name": "gatewayd",
        "context": pg_text.ADAPTERS,  # U+0000 in text, escaped both ways
    }
    if settings.password is not None:
        kwargs["password"] = settings.password.read_text()
    return kwargs


def safe_dsn(dsn: str) -> str:
    """The DSN as it may be logged: host, port, database and user, never a password."""
    try:
        parts = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable dsn)"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"postgresql://{parts.get('user') or ''}@{host}:{port}/{parts.get('dbname') or ''}"
