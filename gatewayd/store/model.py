"""The store's data types: settings, queues, stored items and put results."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from gatewayd.options import SecretRef


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSettings:
    """Where the store lives and how much it may hold.

    ``synchronous="full"`` loses nothing that :meth:`Store.put` returned for, even on
    power loss; ``"normal"`` is faster but a power cut (not a process crash) can lose the
    commits since the last WAL checkpoint. See ``docs/durability.md``.
    """

    path: Path
    synchronous: Literal["full", "normal"] = "full"
    # "postgresql": several instances share one database (docs/scaling.md); ``path``
    # and ``synchronous`` are then SQLite's only, unused.
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    dsn: str | None = None  # a libpq connection URI without its password
    password: SecretRef | None = None  # the database password, by reference
    lease: float = 30.0  # seconds a dead instance's lanes stay held before takeover
    pool_size: int = 4  # connections to PostgreSQL per instance
    max_messages: int = 100_000  # backlog limit, pending+retrying rows over all queues
    max_bytes: int = 256 * 1024 * 1024  # backlog limit on stored body bytes
    max_age: float = 7 * 86400  # seconds; older pending rows expire to the DLQ
    dedup_window: float = 86400  # seconds a finished row's dedup key is remembered
    batch_max: int = 512  # most rows per group-commit transaction
    busy_timeout: float = 5.0  # seconds to wait for another process's write lock

    @property
    def shared(self) -> bool:
        """Several gatewayd instances may use this store at once (and share, with it,
        the gateway's registration and learned devices)."""
        return self.backend != "sqlite"


class Queue(StrEnum):
    """The queues the store holds.

    ``SEGMENT`` is not worked by any sender: its items wait there until the rest of
    their set arrives (:meth:`Store.put_part`) or they expire.
    """

    UPLINK = "uplink"  # UEMessageDelivery bodies bound for the server
    REPORT = "report"  # DeliveryStatusReport bodies bound for the server
    DOWNLINK = "downlink"  # GatewayMessageDelivery bodies bound for a device
    SEGMENT = "segment"  # downlink segments waiting for the rest of their message
    # Device input refused for good at intake (invalid, unknown or refused device): dead
    # on arrival, kept for the operator with its reason; nothing drains or replays it.
    INTAKE = "intake"


class State(StrEnum):
    """Where an item is in its life: waiting, delivered (a dedup tombstone), or in the DLQ."""

    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    """One stored message. ``body`` is empty once the item is done (only its key stays)."""

    id: int
    queue: Queue
    msg_id: str
    lane: str
    body: dict[str, Any] = field(repr=False)
    created: float
    attempts: int
    not_before: float
    expires_at: float | None
    last_error: str | None
    state: str  # "pending" | "done" | "dead"
    size: int = 0  # bytes of the stored JSON body
    finished: float | None = None  # when it became done or dead


@dataclass(frozen=True, slots=True)
class PutResult:
    """The outcome of a put: the item's id, and whether it was stored already."""

    id: int
    duplicate: bool  # the dedup key was already stored (pending, done or dead): nothing new


@dataclass(frozen=True, slots=True)
class Route:
    """A reply route (see :meth:`Store.remember_route`) to write with a put."""

    service_id: str
    origin: dict[str, Any]
    ttl: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PutRequest:
    """One message for :meth:`Store.put_many`, with the same fields as :meth:`Store.put`."""

    msg_id: str
    dedup_key: str
    lane: str
    body: dict[str, Any] = field(repr=False)
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class PartResult:
    """The outcome of :meth:`Store.put_part`.

    ``whole`` is the put of the assembled message when this part completed its set
    (``whole.duplicate`` if that message had been stored before), else ``None``.
    """

    id: int
    duplicate: bool  # this part was stored already: nothing new
    whole: PutResult | None = None
