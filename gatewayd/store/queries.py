"""What both store backends compute the same way: item filters, the per-queue counts of
``stats()``, a batch's repeated keys, and the reasons and log lines of an expiry. Each
backend runs the SQL in its own dialect (``mark`` is its placeholder: ``?`` for SQLite,
``%s`` for psycopg).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import structlog

from gatewayd.store.model import Item, PutRequest, PutResult, Queue, State
from gatewayd.store.schema import encode_body

log = structlog.get_logger(__name__)

# Per queue and state: how many, their body bytes, the oldest's creation time.
COUNTS_SQL = (
    "SELECT queue, state, count(*), coalesce(sum(size), 0), min(created)"
    " FROM items GROUP BY queue, state"
)


def list_filter(
    *, queue: Queue | None, state: str | None, after: int, mark: str
) -> tuple[str, list[Any]]:
    """``WHERE`` text and parameters of ``list_items``: ids after ``after``."""
    return _where([("id >", after), ("queue =", queue and queue.value), ("state =", state)], mark)


def purge_filter(
    *, queue: Queue | None, state: str, older_than: float | None, mark: str
) -> tuple[str, list[Any]]:
    """``WHERE`` text and parameters of ``purge``: finished (or, if pending, created)
    more than ``older_than`` seconds ago."""
    before = None if older_than is None else time.time() - older_than
    terms = [
        ("state =", state),
        ("queue =", queue and queue.value),
        ("coalesce(finished, created) <=", before),
    ]
    return _where(terms, mark)


def _where(terms: list[tuple[str, Any]], mark: str) -> tuple[str, list[Any]]:
    """The terms whose value is not ``None``, ANDed, each compared to a parameter."""
    kept = [(sql, value) for sql, value in terms if value is not None]
    return " AND ".join(f"{sql} {mark}" for sql, _ in kept), [value for _, value in kept]


async def put_each_once(
    queue: Queue,
    requests: Sequence[PutRequest],
    store: Callable[[list[tuple[PutRequest, str]]], Awaitable[list[PutResult]]],
) -> list[PutResult]:
    """``put_many`` as both backends frame it: ``store`` gets each dedup key's first
    request with its encoded body, in one transaction, and returns their results; a key
    repeated within the batch is a duplicate of its first, as it would be in the next
    batch. Duplicates are logged (debug) here."""
    firsts: dict[str, int] = {}
    unique: list[tuple[PutRequest, str]] = []
    stored_as: list[int] = []
    for request in requests:
        at = firsts.get(request.dedup_key)
        if at is None:
            at = firsts[request.dedup_key] = len(unique)
            unique.append((request, encode_body(request.body)))
        stored_as.append(at)
    stored = await store(unique)
    results: list[PutResult] = []
    seen: set[int] = set()
    for request, at in zip(requests, stored_as, strict=True):
        result = stored[at]
        if at in seen:  # a repeat within the batch
            result = PutResult(result.id, duplicate=True)
        seen.add(at)
        if result.duplicate:
            log.debug("store.duplicate", msg_id=request.msg_id, queue=str(queue), id=result.id)
        results.append(result)
    return results


def queue_counts(rows: Iterable[tuple[Any, ...]], now: float) -> dict[str, Any]:
    """``stats()["queues"]`` from the rows of :data:`COUNTS_SQL`."""
    queues: dict[str, Any] = {q.value: _empty() for q in Queue}
    for queue, state, count, size, oldest in rows:
        entry = queues.setdefault(queue, _empty())
        entry[state] = int(count)
        if state != State.DONE:
            entry["bytes"] += int(size)
        if state == State.PENDING:
            entry["oldest_age"] = max(0.0, now - float(oldest))
    return queues


def _empty() -> dict[str, Any]:
    return {"pending": 0, "done": 0, "dead": 0, "bytes": 0, "oldest_age": None}


def expiry_reason(item: Item, at: float) -> str:
    if item.expires_at is not None and item.expires_at <= at:
        return "expired: exprTime passed"
    return "expired: older than max_age"


def as_expired(item: Item, reason: str, at: float) -> Item:
    """``item`` as the dead-letter queue now holds it."""
    return dataclasses.replace(item, state=State.DEAD.value, last_error=reason, finished=at)


def failure_report(
    item: Item,
    report: Callable[[Item], tuple[Queue, PutRequest] | None] | None,
    unreportable: list[tuple[Item, str]],
) -> tuple[Queue, PutRequest] | None:
    """The failure report an expired item calls for, if any; a body it cannot read is
    noted in ``unreportable`` (logged by :func:`log_expired`), never stalls the expiry."""
    try:
        return report(item) if report is not None else None
    except Exception as exc:
        unreportable.append((item, repr(exc)))
        return None


def log_expired(expired: list[Item], unreportable: list[tuple[Item, str]]) -> None:
    for item, error in unreportable:
        log.error("store.expiry_report_failed", msg_id=item.msg_id, id=item.id, error=error)
    for item in expired:
        log.warning(
            "store.expired",
            msg_id=item.msg_id,
            id=item.id,
            queue=str(item.queue),
            reason=item.last_error,
        )
