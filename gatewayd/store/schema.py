"""The SQLite schema of the store and how a connection to it is opened."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from gatewayd.store.model import Item, Queue, StoreSettings

# 2 added the kv table; every statement is IF NOT EXISTS, so running _DDL again on a
# version-1 file upgrades it in place.
SCHEMA_VERSION = 2

# AUTOINCREMENT: ids are never reused after a purge or prune, so an id the CLI printed
# keeps naming the same message, and a new message always sorts after every old one.
_DDL = """
CREATE TABLE IF NOT EXISTS items (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT NOT NULL,
    msg_id      TEXT NOT NULL,
    dedup_key   TEXT NOT NULL,
    lane        TEXT NOT NULL,
    body        TEXT,
    size        INTEGER NOT NULL,
    created     REAL NOT NULL,
    queued      REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    not_before  REAL NOT NULL DEFAULT 0,
    expires_at  REAL,
    last_error  TEXT,
    state       TEXT NOT NULL DEFAULT 'pending',
    finished    REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS items_dedup ON items (queue, dedup_key);
CREATE INDEX IF NOT EXISTS items_head ON items (queue, lane, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS items_state ON items (state, queue, id);
CREATE TABLE IF NOT EXISTS routes (
    service_id  TEXT PRIMARY KEY,
    origin      TEXT NOT NULL,
    expires     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    transport   TEXT NOT NULL,
    device      TEXT NOT NULL,
    service_id  TEXT NOT NULL,
    learned     REAL NOT NULL,
    PRIMARY KEY (transport, device)
);
CREATE TABLE IF NOT EXISTS kv (
    transport   TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    expires     REAL NOT NULL,
    PRIMARY KEY (transport, key)
) WITHOUT ROWID;
"""

ITEM_COLUMNS = (
    "id, queue, msg_id, lane, body, size, created, attempts, not_before, expires_at, "
    "last_error, state, finished"
)


def connect(settings: StoreSettings) -> sqlite3.Connection:
    """Open the database in WAL mode and create the schema if it is missing.

    A read-only file opens fine (SQLite falls back to read-only); creating the schema
    is then skipped when it exists, so the caller learns of read-only storage on its
    first write, where it is refused like a full disk.
    """
    conn = sqlite3.connect(
        settings.path, isolation_level=None, timeout=settings.busy_timeout, cached_statements=64
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {settings.synchronous.upper()}")
        # Truncate the WAL after a checkpoint so a burst does not leave a huge file behind.
        conn.execute("PRAGMA journal_size_limit = 67108864")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version < SCHEMA_VERSION:
            conn.executescript(_DDL + f"PRAGMA user_version = {SCHEMA_VERSION};")
    except BaseException:
        conn.close()
        raise
    return conn


def encode_body(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def row_to_item(row: tuple[Any, ...]) -> Item:
    (
        id_,
        queue,
        msg_id,
        lane,
        body,
        size,
        created,
        attempts,
        not_before,
        expires_at,
        last_error,
        state,
        finished,
    ) = row
    return Item(
        id=id_,
        queue=Queue(queue),
        msg_id=msg_id,
        lane=lane,
        body=json.loads(body) if body is not None else {},
        created=created,
        attempts=attempts,
        not_before=not_before,
        expires_at=expires_at,
        last_error=last_error,
        state=state,
        size=size,
        finished=finished,
    )
