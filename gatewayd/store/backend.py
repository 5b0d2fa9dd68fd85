"""What every store backend offers: the interface the relay, the API, the workers and
the ``gatewayd queue`` CLI use, whatever holds the data.

Two backends implement it: :class:`~gatewayd.store.store.SqliteStore` (the embedded
default, one instance) and :class:`~gatewayd.store.postgres.PostgresStore` (several
instances sharing one PostgreSQL database, docs/scaling.md). The behavioural suite
(tests/test_store.py) runs unchanged against both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from gatewayd.store.follow import Split
from gatewayd.store.model import (
    Item,
    PartResult,
    PutRequest,
    PutResult,
    Queue,
    Route,
    StoreSettings,
)


class Store(Protocol):
    """Durable queues for messages in transit, and the small tables around them.

    The promises every backend keeps:

    - a put returns only after its transaction has committed; a refusal (a full
      backlog, storage that cannot be written) raises :class:`BacklogFullError` and
      stores nothing;
    - :meth:`take` hands out only a lane's head (its lowest id), and a lane has at most
      one item handed out, across every instance sharing the store, until that item is
      settled (:meth:`done_soon`, :meth:`dead`, :meth:`retry_later`) or released;
    - a dedup key stored before returns the existing id with ``duplicate=True``.
    """

    settings: StoreSettings

    @property
    def refusing(self) -> str | None:
        """Why the store refuses writes right now (``disk``, ``readonly``,
        ``unavailable``...), else ``None``; cleared by the next write that succeeds."""
        ...

    async def close(self) -> None:
        """Finish queued work and close; pending items stay for the next start."""
        ...

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
        """Store one message; return only after its transaction has committed."""
        ...

    async def put_many(
        self, queue: Queue, requests: Sequence[PutRequest], *, route: Route | None = None
    ) -> list[PutResult]:
        """Store several messages atomically (all, or none), with ``route`` if given."""
        ...

    async def put_part(
        self,
        request: PutRequest,
        *,
        into: Queue,
        assemble: Callable[[list[dict[str, Any]]], PutRequest | None],
    ) -> PartResult:
        """Store one part of a larger message; once the set is whole, queue the whole."""
        ...

    async def put_rejected(
        self, *, msg_id: str, dedup_key: str, lane: str, reason: str, body: dict[str, Any]
    ) -> str:
        """Record device input refused for good: ``stored``, ``duplicate``, ``dlq_full``."""
        ...

    # --- the sender's side -------------------------------------------------------------

    async def take(self, queue: Queue, *, limit: int, now: float | None = None) -> list[Item]:
        """Up to ``limit`` due lane heads of ``queue``, oldest lane first."""
        ...

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        """Return when work may have arrived for ``queue``, or after ``timeout``."""
        ...

    async def done(self, item_id: int) -> None:
        """Delivered: keep only the dedup tombstone; returns after the commit."""
        ...

    def done_soon(self, item: Item) -> None:
        """Delivered; the write rides on a following transaction (at least once)."""
        ...

    def release(self, item_id: int) -> None:
        """An item handed out and not settled (its send was cancelled) goes back."""
        ...

    async def retry_later(self, item_id: int, *, not_before: float, error: str) -> None:
        """A transient failure: count the attempt and hold the lane until ``not_before``."""
        ...

    async def dead(self, item_id: int, *, reason: str) -> None:
        """A permanent failure: move the item to the dead-letter queue."""
        ...

    async def expire(
        self,
        now: float | None = None,
        *,
        report: Callable[[Item], tuple[Queue, PutRequest] | None] | None = None,
    ) -> list[Item]:
        """Move pending items past their expiry to the DLQ (items being sent stay)."""
        ...

    # --- inspection and the DLQ --------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Counts, bytes and oldest age per queue, the backlog and commit counters."""
        ...

    async def list_items(
        self, *, queue: Queue | None, state: str | None, limit: int, after: int = 0
    ) -> list[Item]:
        """Items by id, optionally of one queue and state; ``after`` pages on by id."""
        ...

    async def get(self, item_id: int) -> Item | None:
        """One item by id, in any state."""
        ...

    async def replay(self, item_id: int) -> bool:
        """Move a dead item back to pending (same id and msgId); False if not dead."""
        ...

    async def purge(
        self, *, queue: Queue | None, state: str = "dead", older_than: float | None = None
    ) -> int:
        """Delete items in ``state``; returns how many."""
        ...

    async def probe(self) -> None:
        """Prove that writes succeed again (ends a refusal); raises as a put would."""
        ...

    async def prune(self, now: float | None = None) -> int:
        """Forget old dedup tombstones, expired routes and kv rows; returns tombstones."""
        ...

    async def limit_size(self, max_bytes: int | None) -> None:
        """Cap the stored data at about ``max_bytes``: reaching it behaves like a full
        disk (how tests and operators rehearse that case)."""
        ...

    # --- reply routes, transports' key/value rows, learned devices ---------------------

    async def remember_route(self, service_id: str, origin: dict[str, Any], ttl: float) -> None:
        """Remember for ``ttl`` seconds that ``origin`` last sent to UE ``service_id``."""
        ...

    async def route(self, service_id: str, now: float | None = None) -> dict[str, Any] | None:
        """The originator to send a reply from ``service_id`` to, if still remembered."""
        ...

    async def kv_get(self, transport: str, keys: Iterable[str]) -> dict[str, str]:
        """The unexpired values of ``keys`` in ``transport``'s table."""
        ...

    async def kv_put(self, transport: str, items: Mapping[str, str], ttl: float) -> None:
        """Set ``items`` in ``transport``'s table, each kept for ``ttl`` seconds."""
        ...

    async def kv_delete(self, transport: str, keys: Iterable[str]) -> None:
        """Remove ``keys`` from ``transport``'s table."""
        ...

    async def learn_device(self, transport: str, device: str, service_id: str) -> bool:
        """Remember a learned device; True if new or its service id changed."""
        ...

    async def forget_device(self, transport: str, device: str) -> None:
        """Forget a learned device."""
        ...

    async def learned_devices(self) -> list[tuple[str, str, str]]:
        """Every learned device as ``(transport, device, service_id)``."""
        ...


async def open_store(settings: StoreSettings, split: Split | None = None) -> Store:
    """Open the backend ``settings.backend`` names (creating its schema if needed).

    ``split``: this process's share when another process on the same SQLite file sends
    from the other queues (``gateway.processes = 2``; not a PostgreSQL mode, which
    shares by leasing lanes among whole instances instead)."""
    if settings.backend == "postgresql":
        from gatewayd.store.postgres import PostgresStore  # an optional dependency

        assert split is None, "gateway.processes is for the SQLite store"
        return await PostgresStore.open(settings)
    from gatewayd.store.store import SqliteStore

    return await SqliteStore.open(settings, split)
