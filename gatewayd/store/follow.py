"""Keeping one process's lane index in step with a store file another process writes too.

With ``gateway.processes = 2`` two processes share one SQLite file (:class:`Split`):
each sends from some queues and puts into the queues the other sends from. After a
commit that put work in the other's queues, a process nudges it (:class:`Neighbour`),
and the nudged one runs a transaction, which catches up. A process
sees another's commit by ``PRAGMA data_version``; reloading the whole index then (what
a lone process does after ``gatewayd queue`` replays or purges) would cost a full read
of the pending rows per commit of the neighbour. Instead the follower reads only what
is new: ids grow with every insert (AUTOINCREMENT, one writer at a time), so the rows
past the highest id it has seen are exactly the ones committed since, and the only
changes a neighbour makes to the queues this process works are such inserts.

Everything else that moves pending rows around (a replay, a purge: rare, operator
work) bumps the ``bulk`` counter in the ``meta`` table, and a follower that sees it
move reloads the whole index, as a lone process does.

Runs on the writer thread, inside the transaction that noticed the other commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gatewayd.store.lanes import Change
from gatewayd.store.model import Queue
from gatewayd.store.schema import ITEM_COLUMNS, row_to_item


class Neighbour(Protocol):
    """The other process on the file, as far as the store needs to reach it."""

    def nudge(self) -> None:
        """Tell it (without waiting) that we committed work into its queues."""

    def watch(self, nudged: Callable[[], None]) -> None:
        """Call ``nudged`` on the running loop whenever it nudges us."""


@dataclass(frozen=True, slots=True)
class Split:
    """This process's share of a store file it shares with a :class:`Neighbour`: the
    queues it sends from (and expires); the neighbour sends from the others."""

    works: frozenset[Queue]
    neighbour: Neighbour


def bump_bulk(conn: sqlite3.Connection) -> None:
    """Record a bulk change to pending rows: every follower reloads its index."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('bulk', 1)"
        " ON CONFLICT (key) DO UPDATE SET value = value + 1"
    )


class Follower:
    """What one process has seen of the file: the highest item id and the bulk counter."""

    def __init__(self, queues: frozenset[str]) -> None:
        assert queues, "a follower works at least one queue"
        self.queues = tuple(sorted(queues))
        self.last_id = -1  # nothing seen yet: the first catch-up is a full reload
        self.bulk = -1
        self._marks = ",".join("?" * len(self.queues))

    def catch_up(self, conn: sqlite3.Connection) -> list[Change] | None:
        """The pending rows of our queues committed by others since :meth:`advance`, as
        ``add`` changes in id order; ``None`` when only a full reload will do."""
        if self.last_id < 0 or _bulk(conn) != self.bulk:
            return None
        rows = conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE id > ? AND state = 'pending'"  # noqa: S608 - constants
            f" AND queue IN ({self._marks}) ORDER BY id",
            (self.last_id, *self.queues),
        )
        changes = []
        for row in rows:
            item = row_to_item(row)
            changes.append(Change("add", item.queue.value, item.id, item.lane, item))
        return changes

    def position(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """Before our COMMIT: where the file stands (highest id, bulk counter), all of it
        in the index once the commit is through (:meth:`advance`)."""
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        return (row[0] if row is not None else 0), _bulk(conn)

    def advance(self, position: tuple[int, int]) -> None:
        """After our COMMIT: what :meth:`catch_up` reads from next time."""
        self.last_id, self.bulk = position


def _bulk(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'bulk'").fetchone()
    return int(row[0]) if row is not None else 0
