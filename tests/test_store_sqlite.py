"""What only the SQLite backend does: its writer thread's batches, read-only files, schema
upgrades in place, and the in-memory lane index and routes (no query per take).

The behaviour every backend shares is tested in test_store.py."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import structlog
from gatewayd_testing import until

from gatewayd.errors import BacklogFullError, StoreError
from gatewayd.processes import Part, PipeNeighbour
from gatewayd.store import Queue, SqliteStore, StoreSettings
from gatewayd.store.follow import Split
from gatewayd.store.kv import StoreKV
from gatewayd.store.schema import connect
from gatewayd.store.writer import Txn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    store = await SqliteStore.open(StoreSettings(path=db))
    yield store
    await store.close()


async def put(store: SqliteStore, key: str, lane: str = "dev-1") -> int:
    result = await store.put(
        Queue.UPLINK, msg_id=key, dedup_key=key, lane=lane, body={"msgId": key}
    )
    assert not result.duplicate
    return result.id


async def test_a_refusal_after_a_write_commits_none_of_that_job(store: SqliteStore) -> None:
    """A job that writes and then refuses (a GatewaydError) leaves nothing behind, while
    the jobs that shared its transaction still commit."""

    def write(key: str, refuse: bool) -> Callable[[Txn], str]:
        def job(txn: Txn) -> str:
            txn.conn.execute(
                "INSERT INTO kv (transport, key, value, expires) VALUES ('t', ?, 'v', 1e12)",
                (key,),
            )
            if refuse:
                raise BacklogFullError("refused after writing", retry_after=1.0)
            return key

        return job

    writer = store._writer  # the unit under test: one writer, jobs sharing a transaction
    # Hold the writer thread in a first job until a, b and c are queued: they are then
    # taken as one batch, one transaction.
    inside, release = threading.Event(), threading.Event()

    def hold(_txn: Txn) -> None:
        inside.set()
        release.wait(10)

    held = asyncio.ensure_future(writer.call(hold))
    await asyncio.to_thread(inside.wait, 10)
    commits = writer.commits
    calls = [asyncio.ensure_future(writer.call(write(key, key == "b"))) for key in ("a", "b", "c")]
    await asyncio.sleep(0)  # each call has queued its job
    release.set()
    await held
    results = await asyncio.gather(*calls, return_exceptions=True)
    # The shared transaction was rolled back and a, b and c rerun alone: a and c commit.
    assert writer.commits - commits == 3  # hold's, then a's and c's
    assert (results[0], results[2]) == ("a", "c")
    assert isinstance(results[1], BacklogFullError)
    keys = await writer.call(
        lambda txn: [row[0] for row in txn.conn.execute("SELECT key FROM kv ORDER BY key")]
    )
    assert keys == ["a", "c"]


_READONLY_SCRIPT = """
import asyncio, sys
from pathlib import Path
from gatewayd.errors import BacklogFullError
from gatewayd.store import Queue, SqliteStore, StoreSettings

async def attempt(store, key):
    try:
        r = await store.put(Queue.UPLINK, msg_id=key, dedup_key=key, lane="d", body={})
    except BacklogFullError as exc:
        print("REFUSED", exc, flush=True)
    else:
        print("STORED", r.id, flush=True)

async def main():
    store = await SqliteStore.open(StoreSettings(path=Path(sys.argv[1])))
    await attempt(store, "a")
    await attempt(store, "b")
    print("WAITING", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await asyncio.sleep(1.1)  # the store reopens a read-only database at most once a second
    await attempt(store, "c")
    await store.close()

asyncio.run(main())
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # Root ignores file modes, so as root the store runs as "nobody", which needs a
    # directory it can reach (pytest's tmp_path is private to root).
    path = Path(tempfile.mkdtemp(prefix="gatewayd-ro-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def _as_nobody_anywhere(shared: Path) -> tuple[list[str], dict[str, str]]:
    """argv prefix and environment for a child that can run as "nobody" wherever the
    clone is: under a directory nobody may enter (a root user's home), neither the
    venv nor the editable gatewayd are reachable, so the store's code and its one
    third-party import are copied under the shared directory and run by the base
    interpreter without site-packages."""
    lib = shared / "lib"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "gatewayd", lib / "gatewayd", ignore=skip)
    shutil.copytree(Path(structlog.__file__).parent, lib / "structlog", ignore=skip)
    env = {"PYTHONPATH": str(lib), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return [os.path.realpath(sys.executable), "-s"], env


def _make_writable(directory: Path) -> None:
    # SQLite created -wal and -shm with the mode of the database file, so they were
    # read-only too: storage is writable again only when all of them are.
    for path in directory.glob("store.db*"):
        path.chmod(0o666)


async def test_read_only_database_refuses_then_recovers(shared_dir: Path) -> None:
    db = shared_dir / "store.db"
    store = await SqliteStore.open(StoreSettings(path=db))
    await store.put(Queue.UPLINK, msg_id="first", dedup_key="first", lane="d", body={})
    await store.close()
    db.chmod(0o444)
    # setpriv (util-linux) rather than Popen(user=): it drops root the same way, and
    # Popen(user=) could not exec this venv's interpreter here.
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    prefix = as_nobody if os.geteuid() == 0 else []
    python, env = _as_nobody_anywhere(shared_dir)
    proc = subprocess.Popen(  # noqa: ASYNC220 - a short-lived child, driven line by line
        [*prefix, *python, "-c", _READONLY_SCRIPT, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=shared_dir,
        env=env,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("WAITING"):
            break
    _make_writable(shared_dir)
    out, _ = proc.communicate("go\n", timeout=30)
    output = "".join(lines) + out
    assert proc.returncode == 0, output
    results = [ln.split()[0] for ln in output.splitlines() if ln.startswith(("REFUSED", "STORED"))]
    assert results == ["REFUSED", "REFUSED", "STORED"], output
    assert "read-only" in output
    assert output.count("store.readonly") == 1, output

    store = await SqliteStore.open(StoreSettings(path=db))
    try:
        keys = [i.msg_id for i in await store.list_items(queue=None, state=None, limit=10)]
        assert keys == ["first", "c"]
    finally:
        await store.close()


async def test_a_version_1_store_gains_the_kv_table(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE routes (service_id TEXT PRIMARY KEY, origin TEXT NOT NULL,"
        " expires REAL NOT NULL); PRAGMA user_version = 1;"
    )
    conn.close()
    store = await SqliteStore.open(StoreSettings(path=db))
    try:
        await StoreKV(store, "sms").put("k", "v", ttl=60)
        assert await StoreKV(store, "sms").get("k") == "v"
    finally:
        await store.close()


# --- the in-memory lane index (SqliteStore.take) ----------------------------------------


async def test_take_hands_out_lane_heads_from_memory(store: SqliteStore) -> None:
    a1, b1, a2 = (
        await put(store, "a1", "a"),
        await put(store, "b1", "b"),
        await put(store, "a2", "a"),
    )
    commits = store._writer.commits
    first = await store.take(Queue.UPLINK, limit=10)
    assert [i.id for i in first] == [a1, b1]
    assert await store.take(Queue.UPLINK, limit=10) == []
    assert store._writer.commits == commits  # no query
    store.done_soon(first[0])  # the lane's next goes at once, before the commit
    (second,) = await store.take(Queue.UPLINK, limit=10)
    assert second.id == a2
    assert store._writer.commits == commits


async def test_take_reads_bodies_it_does_not_keep_and_survives_a_reopen(db: Path) -> None:
    store = await SqliteStore.open(StoreSettings(path=db))
    ids = [await put(store, f"m{i}", f"d{i % 3}") for i in range(6)]
    await store.close()
    store = await SqliteStore.open(StoreSettings(path=db))  # the index comes from disk
    try:
        items = await store.take(Queue.UPLINK, limit=10)
        assert [i.id for i in items] == ids[:3]
        assert [i.body["msgId"] for i in items] == ["m0", "m1", "m2"]
        commits = store._writer.commits
        for item in items:
            store.done_soon(item)
        # The first fetch read the lanes' next bodies along: this round needs no query.
        after = await store.take(Queue.UPLINK, limit=10)
        assert [i.body["msgId"] for i in after] == ["m3", "m4", "m5"]
        assert store._writer.commits == commits
    finally:
        await store.close()


async def test_routes_are_read_from_memory_and_survive_a_reopen(db: Path) -> None:
    store = await SqliteStore.open(StoreSettings(path=db))
    await store.remember_route("ue-1", {"addrType": "AS", "addr": "as-1"}, ttl=60)
    commits = store._writer.commits
    assert await store.route("ue-1") == {"addrType": "AS", "addr": "as-1"}
    assert await store.route("ue-1", now=time.time() + 61) is None  # expired
    assert store._writer.commits == commits  # no transaction
    await store.close()
    store = await SqliteStore.open(StoreSettings(path=db))
    try:
        assert await store.route("ue-1") == {"addrType": "AS", "addr": "as-1"}
        await store.prune(time.time() + 61)
        assert store._routes == {}
    finally:
        await store.close()


# --- two processes on one file (gateway.processes = 2) -------------------------------
# Two stores on one file in this process: two connections, as two processes have, and
# the nudge pipes the owner makes for its parts.


@pytest.fixture
async def pair(db: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    to_north, to_south = os.pipe(), os.pipe()
    north_side = PipeNeighbour(to_north[0], to_south[1])
    south_side = PipeNeighbour(to_south[0], to_north[1])
    north = await SqliteStore.open(StoreSettings(path=db), Split(Part.NORTHBOUND.works, north_side))
    south = await SqliteStore.open(StoreSettings(path=db), Split(Part.DEVICES.works, south_side))
    try:
        yield north, south
    finally:
        await south.close()
        await north.close()
        for fd in (*to_north, *to_south):
            os.close(fd)


def count_snapshots(store: SqliteStore) -> list[int]:
    calls: list[int] = []
    read = store._writer._snapshot

    def counted(conn: sqlite3.Connection) -> object:
        calls.append(1)
        return read(conn)

    store._writer._snapshot = counted
    return calls


async def test_a_process_follows_its_neighbours_puts_without_reading_the_file_again(
    pair: tuple[SqliteStore, SqliteStore],
) -> None:
    north, south = pair
    snapshots = count_snapshots(north)
    ids = [await put(south, f"m{i}", "a" if i % 2 else "b") for i in range(6)]
    # The northbound store hears of them by itself: the devices store nudged it.
    await asyncio.wait_for(north.wait_for_work(Queue.UPLINK, timeout=5), 5)
    await until(lambda: len(north._lanes[Queue.UPLINK]._lanes) == 2, timeout=5)
    commits = north._writer.commits
    heads = await north.take(Queue.UPLINK, limit=10)
    assert [i.id for i in heads] == [ids[0], ids[1]]
    assert [i.body["msgId"] for i in heads] == ["m0", "m1"]
    assert north._writer.commits == commits  # bodies came along with the follow
    for item in heads:
        await north.done(item.id)
    nxt = await north.take(Queue.UPLINK, limit=10)
    assert [i.id for i in nxt] == [ids[2], ids[3]]
    assert snapshots == []  # followed by id, never reloaded
    # The devices store keeps no index of the queues it does not send from.
    assert set(south._lanes) == {Queue.DOWNLINK}
    assert set(north._lanes) == {Queue.UPLINK, Queue.REPORT}


async def test_a_replay_by_a_third_process_reloads_the_followers(
    pair: tuple[SqliteStore, SqliteStore], db: Path
) -> None:
    """``gatewayd queue replay`` puts an old id back among the pending: a follower that
    only read new ids would miss it; the bulk counter has it read everything again."""
    north, south = pair
    first = await put(south, "old", "a")
    await until(lambda: bool(north._lanes[Queue.UPLINK]._lanes), timeout=5)
    (item,) = await north.take(Queue.UPLINK, limit=10)
    await north.dead(item.id, reason="refused")
    later = await put(south, "new", "b")
    cli = await SqliteStore.open(StoreSettings(path=db))
    try:
        assert await cli.replay(first)
    finally:
        await cli.close()
    # The CLI nudges nobody: the follower's next transaction (the expiry sweep's prune,
    # every 2 s in a gateway, at the latest) sees the counter move.
    await north.prune()
    assert len(north._lanes[Queue.UPLINK]._lanes) == 2
    again = await north.take(Queue.UPLINK, limit=10)
    assert sorted(i.id for i in again) == [first, later]


async def test_each_process_expires_only_the_queues_it_sends_from(
    pair: tuple[SqliteStore, SqliteStore],
) -> None:
    north, south = pair
    past = time.time() - 1
    await south.put(Queue.UPLINK, msg_id="u", dedup_key="u", lane="a", body={}, expires_at=past)
    await north.put(Queue.DOWNLINK, msg_id="d", dedup_key="d", lane="a", body={}, expires_at=past)
    assert [i.msg_id for i in await south.expire()] == ["d"]
    assert [i.msg_id for i in await north.expire()] == ["u"]


async def test_a_route_one_process_remembers_is_read_by_the_other(
    pair: tuple[SqliteStore, SqliteStore],
) -> None:
    north, south = pair
    await north.remember_route("ue-1", {"addrType": "AS", "addr": "as-1"}, ttl=60)
    assert await south.route("ue-1") == {"addrType": "AS", "addr": "as-1"}
    assert await south.route("ue-1", now=time.time() + 61) is None


async def test_what_a_rolled_back_transaction_read_of_the_neighbour_is_read_again(
    pair: tuple[SqliteStore, SqliteStore], db: Path
) -> None:
    """A transaction that catches up and then fails rolls back: the next one must read
    the neighbour's rows again, not take them as seen."""
    north, _ = pair
    other = await SqliteStore.open(StoreSettings(path=db))  # puts, and nudges nobody
    try:
        first = await put(other, "m1")
    finally:
        await other.close()

    def broken(txn: Txn) -> None:
        txn.conn.execute(
            "INSERT INTO kv (transport, key, value, expires) VALUES ('t', 'k', 'v', 1)"
        )
        raise RuntimeError("a bug in a job")

    with pytest.raises(StoreError):
        await north._writer.call(broken)
    assert not north._lanes[Queue.UPLINK]._lanes
    await north.prune()  # the next transaction
    (item,) = await north.take(Queue.UPLINK, limit=10)
    assert item.id == first


def _open_and_close(path: str) -> str:
    try:
        connect(StoreSettings(path=Path(path))).close()
    except sqlite3.Error as exc:
        return repr(exc)
    return "ok"


def test_two_processes_creating_one_store_at_once_both_open_it(tmp_path: Path) -> None:
    """The two parts of a two-process gateway open a fresh file at the same moment:
    switching it to WAL failed with "database is locked" at once for one of them in about
    one start in ten (SQLite does not wait for that lock); now it waits."""
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        for n in range(30):
            path = str(tmp_path / f"store-{n}" / "gatewayd.db")
            assert pool.map(_open_and_close, [path, path]) == ["ok", "ok"]
