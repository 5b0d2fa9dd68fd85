"""A transport's own durable key/value table, offered to plugins as ``context.kv``.

Transports need to remember small facts across a restart that belong to their
protocol, not to MSGin5G: which SMSC message ids a downlink was submitted under, so a
delivery receipt that arrives after a restart still finds its message and nothing is
sent twice. Rows are namespaced by transport name and expire: every value is written
with a time to live, and :meth:`~gatewayd.store.Store.prune` drops the expired ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from gatewayd.store.backend import Store


class StoreKV:
    """:class:`gatewayd.api.KeyValueStore` on the gateway's SQLite store."""

    def __init__(self, store: Store, transport: str) -> None:
        self._store = store
        self._transport = transport

    async def get(self, key: str) -> str | None:
        return (await self._store.kv_get(self._transport, (key,))).get(key)

    async def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        return await self._store.kv_get(self._transport, keys)

    async def put(self, key: str, value: str, *, ttl: float) -> None:
        await self._store.kv_put(self._transport, {key: value}, ttl)

    async def put_many(self, items: Mapping[str, str], *, ttl: float) -> None:
        await self._store.kv_put(self._transport, items, ttl)

    async def delete(self, keys: Iterable[str]) -> None:
        await self._store.kv_delete(self._transport, keys)


class MemoryKV:
    """:class:`gatewayd.api.KeyValueStore` in a dict: for ``check-config`` and unit tests.

    ``rows`` maps a key to (value, expiry as ``time.time()``); a test may look at it, or
    share one MemoryKV between two transport instances to play a restart.
    """

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, float]] = {}

    async def get(self, key: str) -> str | None:
        return (await self.get_many((key,))).get(key)

    async def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        now = time.time()
        found: dict[str, str] = {}
        for key in keys:
            row = self.rows.get(key)
            if row is not None and row[1] > now:
                found[key] = row[0]
        return found

    async def put(self, key: str, value: str, *, ttl: float) -> None:
        await self.put_many({key: value}, ttl=ttl)

    async def put_many(self, items: Mapping[str, str], *, ttl: float) -> None:
        expires = time.time() + ttl
        for key, value in items.items():
            self.rows[key] = (value, expires)

    async def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.rows.pop(key, None)
