"""Statements several jobs of the shared store share: inserting items, and the lane
rows that keep one item in flight per lane across instances (:mod:`gatewayd.store.postgres`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from gatewayd.store.model import PutRequest, Queue
from gatewayd.store.pg_tx import Tx
from gatewayd.store.schema import encode_body

WORKED: Final = frozenset({Queue.UPLINK.value, Queue.REPORT.value, Queue.DOWNLINK.value})
_NO_HEAD: Final = 2**63 - 1  # a settled lane's head candidate: least() keeps the row's


async def insert_items(
    tx: Tx,
    queue: Queue,
    rows: list[tuple[PutRequest, str, int]],
    now: float,
    *,
    skip_stored: bool = False,
) -> dict[str, int]:
    """Insert new items in order (ids rise in the order given) and open their lanes;
    their ids by dedup key. ``skip_stored``: a key stored before is left out (no error),
    and missing from the result."""
    conflict = " ON CONFLICT (queue, dedup_key) DO NOTHING" if skip_stored else ""
    inserted = await tx.all(
        "INSERT INTO items (queue, msg_id, dedup_key, lane, body, size, created, queued,"
        " expires_at) SELECT %s, m, k, l, b, s, %s, %s, e FROM unnest(%s::text[],"
        " %s::text[], %s::text[], %s::text[], %s::int[], %s::float8[])"
        f" WITH ORDINALITY AS t(m, k, l, b, s, e, n) ORDER BY n{conflict}"
        " RETURNING id, dedup_key",
        (
            queue.value,
            now,
            now,
            [r.msg_id for r, _, _ in rows],
            [r.dedup_key for r, _, _ in rows],
            [r.lane for r, _, _ in rows],
            [body for _, body, _ in rows],
            [size for _, _, size in rows],
            [r.expires_at for r, _, _ in rows],
        ),
    )
    ids = {str(key): int(item_id) for item_id, key in inserted}
    stored = [(r, size) for r, _, size in rows if r.dedup_key in ids]
    tx.messages += len(stored)
    tx.bytes += sum(size for _, size in stored)
    tx.puts += len(stored)
    if queue.value in WORKED:
        open_lanes(tx, queue.value, [(r.lane, ids[r.dedup_key]) for r, _ in stored])
    return ids


def open_lanes(tx: Tx, queue: str, items: list[tuple[str, int]]) -> None:
    """New pending items (or a replayed older one) in their lanes: applied at the end of
    the transaction by :func:`apply_lanes`."""
    for lane, item_id in items:
        key = (queue, lane)
        tx.opened[key] = min(item_id, tx.opened.get(key, item_id))
    tx.woken.add(queue)


def settle_lanes(tx: Tx, lanes: Iterable[tuple[str, str]]) -> None:
    """Lanes whose head was settled, retried or released: freed and moved to their next
    head at the end of the transaction by :func:`apply_lanes`."""
    for key in lanes:
        tx.settled.add(key)
        tx.woken.add(key[0])


async def apply_lanes(tx: Tx) -> None:
    """Every lane row the transaction touches, in two statements at its end.

    First one sorted pass locks (or creates) them all: an existing row stays locked until
    the commit (``DO UPDATE``, never ``DO NOTHING``), so a settlement elsewhere cannot
    find the lane empty and delete it under an item being added here; and since every
    transaction takes its lane locks in one pass in the same order, two instances never
    deadlock on them. Then, in a fresh statement that sees what committed while it
    waited, each settled lane takes its new head's id and due time, or goes if empty.
    """
    keys = sorted(tx.opened.keys() | tx.settled)
    if not keys:
        return
    await tx.run(
        "INSERT INTO lanes AS l (queue, lane, head, ready_at)"
        " SELECT q, n, h, 0 FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS t(q, n, h)"
        " ORDER BY q, n ON CONFLICT (queue, lane) DO UPDATE"
        " SET head = least(l.head, excluded.head),"
        " ready_at = CASE WHEN excluded.head < l.head THEN 0 ELSE l.ready_at END",
        (
            [q for q, _ in keys],
            [lane for _, lane in keys],
            [tx.opened.get(key, _NO_HEAD) for key in keys],
        ),
    )
    settled = sorted(tx.settled)
    if not settled:
        return
    await tx.run(
        "WITH wanted AS (SELECT * FROM unnest(%s::text[], %s::text[]) AS w(queue, lane)),"
        " head AS (SELECT w.queue, w.lane, h.id, h.not_before FROM wanted w LEFT JOIN LATERAL"
        " (SELECT i.id, i.not_before FROM items i WHERE i.queue = w.queue AND i.lane = w.lane"
        " AND i.state = 'pending' ORDER BY i.id LIMIT 1) h ON true),"
        " kept AS (UPDATE lanes l SET owner = NULL, lease_until = NULL, head = head.id,"
        " ready_at = head.not_before FROM head"
        " WHERE l.queue = head.queue AND l.lane = head.lane AND head.id IS NOT NULL)"
        " DELETE FROM lanes l USING head WHERE l.queue = head.queue AND l.lane = head.lane"
        " AND head.id IS NULL",
        ([q for q, _ in settled], [lane for _, lane in settled]),
    )


async def upsert_route(tx: Tx, service_id: str, origin: str, expires: float) -> None:
    await tx.run(
        "INSERT INTO routes (service_id, origin, expires) VALUES (%s, %s, %s)"
        " ON CONFLICT (service_id) DO UPDATE SET origin = excluded.origin,"
        " expires = excluded.expires",
        (service_id, origin, expires),
    )


async def put_report(tx: Tx, queue: Queue, request: PutRequest, *, now: float) -> None:
    """A failure report stored with the expiry that caused it (not held to the limits:
    it takes the slot the expired item freed)."""
    if await tx.maybe(
        "SELECT 1 FROM items WHERE queue = %s AND dedup_key = %s",
        (queue.value, request.dedup_key),
    ):
        return
    body = encode_body(request.body)
    await insert_items(tx, queue, [(request, body, len(body.encode()))], now)
