"""The PostgreSQL schema of the shared store, as numbered migrations.

A database starts empty; each migration brings it one version up. :func:`migrate` runs
at every start under a transaction-scoped advisory lock, so instances starting
together migrate once: the others wait for the lock, then find nothing left to do.
A database migrated by a newer gatewayd is refused rather than written with the
wrong assumptions.
"""

from __future__ import annotations

from typing import Final

import psycopg
import structlog

from gatewayd.errors import StoreError

log = structlog.get_logger(__name__)

# pg_advisory_xact_lock key: "gwd" + "schema" as one bigint, constant across versions.
_LOCK: Final = 0x677764_736368656D

# ``lanes`` has one row per (queue, lane) with pending items: its head's id and due time
# (``not_before``), and which instance holds the lane (its head is being sent) until
# when. Taking work locks lane rows (FOR UPDATE SKIP LOCKED), never items, so the cost
# of a take follows the lanes with due work, not the backlog (docs/scaling.md).
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE items (
        id          bigserial PRIMARY KEY,
        queue       text NOT NULL,
        msg_id      text NOT NULL,
        dedup_key   text NOT NULL,
        lane        text NOT NULL,
        body        text,
        size        integer NOT NULL,
        created     double precision NOT NULL,
        queued      double precision NOT NULL,
        attempts    integer NOT NULL DEFAULT 0,
        not_before  double precision NOT NULL DEFAULT 0,
        expires_at  double precision,
        last_error  text,
        state       text NOT NULL DEFAULT 'pending',
        finished    double precision
    );
    CREATE UNIQUE INDEX items_dedup ON items (queue, dedup_key);
    CREATE INDEX items_head ON items (queue, lane, id) WHERE state = 'pending';
    CREATE INDEX items_state ON items (state, queue, id);
    CREATE INDEX items_expires ON items (expires_at)
        WHERE state = 'pending' AND expires_at IS NOT NULL;
    CREATE INDEX items_queued ON items (queued) WHERE state = 'pending';
    CREATE INDEX items_done ON items (finished) WHERE state = 'done';
    CREATE TABLE lanes (
        queue       text NOT NULL,
        lane        text NOT NULL,
        head        bigint NOT NULL,
        ready_at    double precision NOT NULL,
        owner       text,
        lease_until double precision,
        PRIMARY KEY (queue, lane)
    );
    CREATE INDEX lanes_head ON lanes (queue, head);
    CREATE INDEX lanes_owner ON lanes (owner) WHERE owner IS NOT NULL;
    CREATE TABLE routes (
        service_id  text PRIMARY KEY,
        origin      text NOT NULL,
        expires     double precision NOT NULL
    );
    CREATE TABLE devices (
        transport   text NOT NULL,
        device      text NOT NULL,
        service_id  text NOT NULL,
        learned     double precision NOT NULL,
        PRIMARY KEY (transport, device)
    );
    CREATE TABLE kv (
        transport   text NOT NULL,
        key         text NOT NULL,
        value       text NOT NULL,
        expires     double precision NOT NULL,
        PRIMARY KEY (transport, key)
    );
    """,
)


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """Bring the schema to the newest version under the advisory lock; return it."""
    newest = len(MIGRATIONS)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS gatewayd_schema"
            " (version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM gatewayd_schema")
        row = await cur.fetchone()
        current = int(row[0]) if row is not None else 0  # type: ignore[call-overload]
        if current > newest:
            raise StoreError(
                f"the database's store schema is version {current}; this gatewayd knows"
                f" versions up to {newest} (a newer gatewayd migrated it)"
            )
        for version in range(current + 1, newest + 1):
            await conn.execute(MIGRATIONS[version - 1].encode())
            await conn.execute("INSERT INTO gatewayd_schema (version) VALUES (%s)", (version,))
            log.info("store.migrated", version=version)
    return newest
