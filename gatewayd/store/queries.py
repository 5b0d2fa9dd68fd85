"""What both store backends compute the same way: item filters, the per-queue counts of
``stats()``, and the reasons and log lines of an expiry. Each backend runs the SQL in
its own dialect (``mark`` is its placeholder: ``?`` for SQLite, ``%s`` for psycopg).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import structlog

from gatewayd.store.model import Item, Queue, State

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
    clauses = [f"id > {mark}"]
    params: list[Any] = [after]
    if queue is not None:
        clauses.append(f"queue = {mark}")
        params.append(queue.value)
    if state is not None:
        clauses.append(f"state = {mark}")
        params.append(state)
    return " AND ".join(clauses), params


def purge_filter(
    *, queue: Queue | None, state: str, older_than: float | None, mark: str
) -> tuple[str, list[Any]]:
    """``WHERE`` text and parameters of ``purge``: finished (or, if pending, created)
    more than ``older_than`` seconds ago."""
    clauses = [f"state = {mark}"]
    params: list[Any] = [state]
    if queue is not None:
        clauses.append(f"queue = {mark}")
        params.append(queue.value)
    if older_than is not None:
        clauses.append(f"coalesce(finished, created) <= {mark}")
        params.append(time.time() - older_than)
    return " AND ".join(clauses), params


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
