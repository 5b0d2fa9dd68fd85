"""The SQLite schema of the store and how a connection to it is opened."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Final

from gatewayd.store.model import Item, Queue, StoreSettings

# 2 added the kv table, 3 the indexes of the expiry sweep and of prune, 4 the meta table;
# every statement is IF NOT EXISTS, so running _DDL again on an older file upgrades it
# in place.
SCHEMA_VERSION = 4
SQLITE_BUSY: Final = 5  # SQLite's primary result code for a lock held elsewhere
_WAL_RETRY_SECONDS: Final = 0.01

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
-- The sweep every 2 s: expiry and prune read only the rows past their time, so their
-- cost follows what expires, not the backlog or the day's dedup tombstones.
-- Only rows that can expire by exprTime (most have none): less to maintain per write.
CREATE INDEX IF NOT EXISTS items_expires ON items (expires_at)
    WHERE state = 'pending' AND expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_queued ON items (queued) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS items_done ON items (finished) WHERE state = 'done';
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
-- Counters every process sharing the file reads (gatewayd.store.follow): 'bulk' moves
-- when a replay or purge changes pending rows other than by inserting them.
CREATE TABLE IF NOT EXISTS meta (
    key         TEXT PRIMARY KEY,
    value       INTEGER NOT NULL
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
    private_dir(Path(settings.path).parent)
    _private_file(Path(settings.path))
    conn = sqlite3.connect(
        settings.path, isolation_level=None, timeout=settings.busy_timeout, cached_statements=64
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout * 1000)}")
        _enter_wal(conn, settings.busy_timeout)
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


def _enter_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """``journal_mode = WAL``, waiting up to ``timeout`` for another connection.

    On a file another process is creating at the same moment (the two parts of a
    ``gateway.processes = 2`` gateway at their first start), the switch fails with
    SQLITE_BUSY at once: SQLite does not call the busy handler for it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == SQLITE_BUSY
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(_WAL_RETRY_SECONDS)


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) mode 0700, whatever the umask.

    Message bodies, Service IDs and reply routes live here. A directory that already
    exists keeps its mode: it may be shared (a systemd StateDirectory is already 0700).
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for created in missing:
        # mkdir's mode is masked by the umask; the directories we made are ours to fix.
        with contextlib.suppress(OSError):
            os.chmod(created, 0o700)


def _private_file(path: Path) -> None:
    """The database file, and its -wal/-shm siblings if any, owner-only.

    Created 0600 before SQLite opens it, so no umask can make it readable by others;
    SQLite gives the -wal and -shm files the database file's mode.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.fchmod(fd, 0o600)
        os.close(fd)
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        # An existing file loses group and other access only: a read-only database
        # stays read-only (SQLite then refuses writes like a full disk).
        with contextlib.suppress(OSError):
            mode = os.stat(name).st_mode & 0o777
            if mode & 0o077:
                os.chmod(name, mode & 0o700)


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
