"""The store's hot path: each worked queue's pending items by lane, in memory.

The database stays the truth; this index is a view of it, kept in step on the loop:
every committed transaction hands its changes over (:class:`Change`), in commit order,
and a transaction that sees another process's commit (``gatewayd queue`` replays or
purges) or made a bulk change reloads the whole view from SQL (a *snapshot*). So a
message just committed goes out without a query, and handing out the next item costs
the same at 10 or 100,000 pending items; SQL only runs at start, after such reloads,
and to fetch bodies not kept in memory (:data:`CACHE_MAX`).

Per-lane order: only a lane's head (its lowest pending id) is ever handed out, and a
lane whose head is out (being sent, or held by an expiry) hands out nothing else.
Everything here runs on the event loop.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Final

from gatewayd.store.model import Item

# Bodies kept in memory for items stored by this process and not yet handed out. Past
# it, an item is fetched by id when its turn comes (a primary-key read, whatever the
# backlog): memory stays bounded while a large backlog builds up.
CACHE_MAX: Final = 4096
# A fetch also reads this many of each lane's next items into the cache, so draining a
# backlog costs one fetch per PREFETCH rounds, not one per round.
PREFETCH: Final = 16


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change to a pending set: ``add`` (a new pending item, with its
    ``item`` when it can be cached), ``finish`` (done, dead or expired) or ``park``
    (a retry: the head waits until ``not_before``)."""

    kind: str
    queue: str
    id: int
    lane: str
    item: Item | None = None
    not_before: float = 0.0


class Lanes:
    """One queue's pending items by lane; see the module docstring."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[int]] = {}
        # Lanes whose head may go now, in the order they became ready (a dict: an
        # insertion-ordered set with O(1) removal).
        self._ready: dict[str, None] = {}
        self._out: dict[str, int] = {}  # lane -> its head, handed out or held
        self._parked: list[tuple[float, int, str]] = []  # heads waiting out a retry
        self._cache: dict[int, Item] = {}
        # Settled on the loop, commit not yet seen: a snapshot read before that commit
        # must not bring them back.
        self.settling: set[int] = set()

    def load(self, rows: list[tuple[int, str, float]]) -> None:
        """Replace the view with a snapshot: ``(id, lane, not_before)`` in id order."""
        lanes: dict[str, deque[int]] = {}
        heads: dict[str, float] = {}
        for item_id, lane, not_before in rows:
            if item_id in self.settling:
                continue
            ids = lanes.get(lane)
            if ids is None:
                lanes[lane] = ids = deque()
                heads[lane] = not_before
            ids.append(item_id)
        out = {lane: i for lane, i in self._out.items() if i in lanes.get(lane, ())}
        self._lanes, self._out, self._ready, self._parked = lanes, out, {}, []
        for lane, ids in lanes.items():
            if lane in out:
                continue
            if heads[lane] > 0:
                # Maybe due already: take() compares with its own clock.
                heapq.heappush(self._parked, (heads[lane], ids[0], lane))
            else:
                self._ready[lane] = None
        self._cache = {}  # rare: bodies are read again as their turn comes

    def add(self, item_id: int, lane: str, item: Item | None) -> bool:
        """A committed new pending item; True when its lane became ready."""
        ids = self._lanes.get(lane)
        if ids is None:
            self._lanes[lane] = ids = deque()
        ids.append(item_id)
        if item is not None and len(self._cache) < CACHE_MAX:
            self._cache[item_id] = item
        if len(ids) == 1 and lane not in self._out:
            self._ready[lane] = None
            return True
        return False

    def remove(self, item_id: int, lane: str) -> bool:
        """An item is no longer pending; True when its lane became ready."""
        self._cache.pop(item_id, None)
        ids = self._lanes.get(lane)
        if not ids:
            return False
        if ids[0] != item_id:
            if item_id in ids:  # expired behind its head: rare, and lanes are short then
                ids.remove(item_id)
            return False
        ids.popleft()
        if self._out.get(lane) == item_id:
            del self._out[lane]
        if not ids:
            del self._lanes[lane]
            self._ready.pop(lane, None)
            return False
        if lane in self._out:
            return False
        self._ready[lane] = None
        return True

    def take(self, limit: int, now: float) -> list[tuple[str, int, Item | None]]:
        """Hand out up to ``limit`` lane heads (lane, id, cached item or ``None``)."""
        while self._parked and self._parked[0][0] <= now:
            _, item_id, lane = heapq.heappop(self._parked)
            ids = self._lanes.get(lane)
            if ids and ids[0] == item_id and lane not in self._out:
                self._ready[lane] = None
        chosen: list[tuple[str, int, Item | None]] = []
        while self._ready and len(chosen) < limit:
            lane = next(iter(self._ready))
            del self._ready[lane]
            ids = self._lanes.get(lane)
            if not ids or lane in self._out:
                continue
            self._out[lane] = ids[0]
            chosen.append((lane, ids[0], self._cache.pop(ids[0], None)))
        return chosen

    def upcoming(self, lanes: list[str]) -> list[int]:
        """Ids behind these lanes' heads whose bodies are not in memory, as many as fit."""
        room = CACHE_MAX - len(self._cache)
        wanted: list[int] = []
        for lane in lanes:
            ids = self._lanes.get(lane, ())
            for index, item_id in enumerate(ids):
                if index > PREFETCH or len(wanted) >= room:
                    break
                if index and item_id not in self._cache:
                    wanted.append(item_id)
        return wanted

    def keep(self, item: Item) -> None:
        """Cache a prefetched body, if the item is still pending here."""
        ids = self._lanes.get(item.lane)
        if ids and len(self._cache) < CACHE_MAX and ids[0] != item.id:
            self._cache[item.id] = item

    def hold(self, item_id: int, lane: str) -> bool:
        """Keep a head from being handed out (an expiry is deciding on it)."""
        ids = self._lanes.get(lane)
        if not ids or ids[0] != item_id or lane in self._out:
            return False
        self._out[lane] = item_id
        self._ready.pop(lane, None)
        return True

    def release(self, item_id: int, lane: str) -> bool:
        """A head handed out or held comes back unsettled; True when its lane is ready."""
        if self._out.get(lane) != item_id:
            return False
        del self._out[lane]
        self._ready[lane] = None
        return True

    def park(self, item_id: int, lane: str, not_before: float) -> None:
        """The head goes again at ``not_before`` (a retry)."""
        if self._out.get(lane) == item_id:
            del self._out[lane]
        self._cache.pop(item_id, None)  # its attempts and error changed: read it again
        self._ready.pop(lane, None)
        heapq.heappush(self._parked, (not_before, item_id, lane))
