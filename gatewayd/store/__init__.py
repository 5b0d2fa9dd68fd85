"""The durable store between the transports and the northbound link (SQLite, WAL).

Nothing accepted is lost: :meth:`Store.put` returns only after its transaction has
committed, and many concurrent puts share one commit. See ``docs/durability.md``.
"""

from __future__ import annotations

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
from gatewayd.store.store import Store

__all__ = [
    "Item",
    "PartResult",
    "PutRequest",
    "PutResult",
    "Queue",
    "Route",
    "State",
    "Store",
    "StoreSettings",
]
