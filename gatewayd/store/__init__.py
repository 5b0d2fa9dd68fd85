"""The durable store between the transports and the northbound link: SQLite (WAL) for one
instance, PostgreSQL for several (docs/scaling.md).

Nothing accepted is lost: :meth:`Store.put` returns only after its transaction has
committed, and many concurrent puts share one commit. See ``docs/durability.md``.
"""

from __future__ import annotations

from gatewayd.store.backend import Store, open_store
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
from gatewayd.store.store import SqliteStore

__all__ = [
    "Item",
    "PartResult",
    "PutRequest",
    "PutResult",
    "Queue",
    "Route",
    "SqliteStore",
    "State",
    "Store",
    "StoreSettings",
    "open_store",
]
