"""The durable store against real SQLite files: commit, dedup, order, expiry, limits, crashes."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
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

from gatewayd.errors import BacklogFullError
from gatewayd.store import PutRequest, Queue, Store, StoreSettings
from gatewayd.store.kv import StoreKV
from gatewayd.store.writer import Txn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[Store]:
    store = await Store.open(StoreSettings(path=db))
    yield store
    await store.close()


async def put(store: Store, key: str, lane: str = "dev-1", **kw: object) -> int:
    result = await store.put(
        Queue.UPLINK, msg_id=key, dedup_key=key, lane=lane, body={"msgId": key}, **kw
    )
    assert not result.duplicate
    return result.id


async def test_put_commits_and_dedups_across_reopen(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db))
    first = await store.put(
        Queue.UPLINK, msg_id="m1", dedup_key="dev-1/7", lane="dev-1", body={"payload": "hé"}
    )
    again = await store.put(
        Queue.UPLINK, msg_id="m1-other", dedup_key="dev-1/7", lane="dev-1", body={}
    )
    assert (again.id, again.duplicate, first.duplicate) == (first.id, True, False)
    await store.close()

    store = await Store.open(StoreSettings(path=db))
    try:
        after = await store.put(Queue.UPLINK, msg_id="m1", dedup_key="dev-1/7", lane="x", body={})
        assert after == first.__class__(first.id, duplicate=True)
        # The same key in another queue is another message.
        other = await store.put(Queue.DOWNLINK, msg_id="m1", dedup_key="dev-1/7", lane="x", body={})
        assert not other.duplicate
        item = await store.get(first.id)
        assert item is not None
        assert (item.msg_id, item.body, item.state) == ("m1", {"payload": "hé"}, "pending")
        # Done keeps only a tombstone, which still dedups.
        await store.done(first.id)
        done = await store.get(first.id)
        assert done is not None
        assert (done.state, done.body) == ("done", {})
        dup = await store.put(Queue.UPLINK, msg_id="m1", dedup_key="dev-1/7", lane="x", body={})
        assert dup.duplicate
    finally:
        await store.close()


async def test_due_keeps_per_lane_order(store: Store) -> None:
    a1 = await put(store, "a1", "a")
    b1 = await put(store, "b1", "b")
    a2 = await put(store, "a2", "a")
    c1 = await put(store, "c1", "c")

    heads = await store.due(Queue.UPLINK, limit=10)
    assert [i.id for i in heads] == [a1, b1, c1]  # a2 waits behind a1
    assert [i.id for i in await store.due(Queue.UPLINK, limit=2)] == [a1, b1]
    assert [i.id for i in await store.due(Queue.UPLINK, limit=10, busy_lanes={"a"})] == [b1, c1]
    assert await store.due(Queue.DOWNLINK, limit=10) == []

    await store.done(a1)
    assert [i.id for i in await store.due(Queue.UPLINK, limit=10)] == [b1, a2, c1]
    # A dead head also frees its lane.
    await store.dead(a2, reason="permanent: 400")
    assert [i.id for i in await store.due(Queue.UPLINK, limit=10)] == [b1, c1]


async def test_retry_later_holds_the_lane_until_not_before(store: Store) -> None:
    first = await put(store, "a1", "a")
    await put(store, "a2", "a")
    now = time.time()
    await store.retry_later(first, not_before=now + 60, error="503")
    # The head is not due, and its successor must not overtake it.
    assert await store.due(Queue.UPLINK, limit=10, now=now) == []
    (item,) = await store.due(Queue.UPLINK, limit=10, now=now + 61)
    assert (item.id, item.attempts, item.last_error) == (first, 1, "503")


async def test_expiry_by_exprtime_and_max_age(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db, max_age=3600))
    try:
        now = time.time()
        soon = await put(store, "soon", "a", expires_at=now + 10)
        later = await put(store, "later", "b", expires_at=now + 7200)
        plain = await put(store, "plain", "c")
        assert await store.expire(now) == []

        expired = await store.expire(now + 11)
        assert [(i.id, i.state, i.last_error) for i in expired] == [
            (soon, "dead", "expired: exprTime passed")
        ]
        expired = await store.expire(now + 3601)
        assert {i.id for i in expired} == {later, plain}
        assert all(i.last_error == "expired: older than max_age" for i in expired)
        dead = await store.list_items(queue=Queue.UPLINK, state="dead", limit=10)
        assert [i.id for i in dead] == [soon, later, plain]
        stats = await store.stats()
        assert stats["queues"]["uplink"]["dead"] == 3
        assert stats["backlog"]["messages"] == 0
    finally:
        await store.close()


async def test_replay_keeps_msg_id_and_resets_attempts(store: Store) -> None:
    item_id = await put(store, "m-42", "a", expires_at=time.time() - 1)
    await store.retry_later(item_id, not_before=0, error="timeout")
    (expired,) = await store.expire()
    assert expired.id == item_id

    assert await store.replay(item_id)
    assert not await store.replay(item_id)  # no longer dead
    assert not await store.replay(99999)
    (item,) = await store.due(Queue.UPLINK, limit=10)
    assert (item.id, item.msg_id, item.attempts, item.state) == (item_id, "m-42", 0, "pending")
    assert item.expires_at is None  # or it would die again at once
    assert await store.expire() == []


async def test_backlog_full_by_count_refuses_and_stores_nothing(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db, max_messages=3))
    try:
        ids = [await put(store, f"m{i}", f"d{i}") for i in range(3)]
        with structlog.testing.capture_logs() as logs:
            for key in ("m3", "m4"):
                with pytest.raises(BacklogFullError) as refused:
                    await put(store, key)
        assert refused.value.reason == "backlog_full"
        assert refused.value.retry_after is not None
        assert [e["event"] for e in logs].count("store.full") == 1  # once per episode
        # A redelivery of a stored message is still recognised while full.
        dup = await store.put(Queue.UPLINK, msg_id="m0", dedup_key="m0", lane="d0", body={})
        assert dup.duplicate
        # An atomic batch that does not fit leaves nothing behind.
        await store.done(ids[0])
        batch = [PutRequest(msg_id=k, dedup_key=k, lane="s", body={"seg": k}) for k in ("s1", "s2")]
        with pytest.raises(BacklogFullError):
            await store.put_many(Queue.UPLINK, batch)
        pending = await store.list_items(queue=None, state="pending", limit=10)
        assert [i.id for i in pending] == ids[1:]
        with structlog.testing.capture_logs() as logs:
            await put(store, "m5")
        assert "store.recovered" in [e["event"] for e in logs]
        assert (await store.stats())["backlog"]["messages"] == 3
    finally:
        await store.close()


async def test_a_refusal_after_a_write_commits_none_of_that_job(store: Store) -> None:
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


async def test_backlog_full_by_bytes(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db, max_bytes=1000))
    try:
        big = {"payload": "x" * 600}
        await store.put(Queue.DOWNLINK, msg_id="a", dedup_key="a", lane="d", body=big)
        with pytest.raises(BacklogFullError):
            await store.put(Queue.DOWNLINK, msg_id="b", dedup_key="b", lane="d", body=big)
        small = await store.put(Queue.DOWNLINK, msg_id="c", dedup_key="c", lane="d", body={})
        assert not small.duplicate
        keys = [i.msg_id for i in await store.list_items(queue=None, state=None, limit=10)]
        assert keys == ["a", "c"]
    finally:
        await store.close()


async def test_disk_full_refuses_then_recovers(store: Store, db: Path) -> None:
    body = {"payload": "y" * 3000}
    await store.limit_size(64 * 1024 + (await store.stats())["db_bytes"])
    stored = 0
    with structlog.testing.capture_logs() as logs:
        refused: BacklogFullError | None = None
        for i in range(1000):
            try:
                await store.put(
                    Queue.UPLINK, msg_id=f"m{i}", dedup_key=f"m{i}", lane="d", body=body
                )
            except BacklogFullError as exc:
                refused = exc
                break
            stored += 1
        with pytest.raises(BacklogFullError):
            await store.put(Queue.UPLINK, msg_id="x", dedup_key="x", lane="d", body=body)
    assert refused is not None
    assert "disk is full" in str(refused)
    assert 5 < stored < 1000
    assert [e["event"] for e in logs].count("store.full") == 1
    items = await store.list_items(queue=Queue.UPLINK, state=None, limit=2000)
    assert len(items) == stored  # the refused ones left no trace
    assert (await store.stats())["backlog"]["messages"] == stored

    await store.limit_size(None)  # space returns
    with structlog.testing.capture_logs() as logs:
        result = await store.put(Queue.UPLINK, msg_id="x", dedup_key="x", lane="d", body=body)
    assert not result.duplicate
    assert "store.recovered" in [e["event"] for e in logs]


_READONLY_SCRIPT = """
import asyncio, sys
from pathlib import Path
from gatewayd.errors import BacklogFullError
from gatewayd.store import Queue, Store, StoreSettings

async def attempt(store, key):
    try:
        r = await store.put(Queue.UPLINK, msg_id=key, dedup_key=key, lane="d", body={})
    except BacklogFullError as exc:
        print("REFUSED", exc, flush=True)
    else:
        print("STORED", r.id, flush=True)

async def main():
    store = await Store.open(StoreSettings(path=Path(sys.argv[1])))
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
    store = await Store.open(StoreSettings(path=db))
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

    store = await Store.open(StoreSettings(path=db))
    try:
        keys = [i.msg_id for i in await store.list_items(queue=None, state=None, limit=10)]
        assert keys == ["first", "c"]
    finally:
        await store.close()


async def test_concurrent_puts_share_commits(store: Store) -> None:
    before = await store.stats()
    n = 300
    results = await asyncio.gather(
        *(
            store.put(Queue.UPLINK, msg_id=f"m{i}", dedup_key=f"m{i}", lane=f"d{i % 7}", body={})
            for i in range(n)
        )
    )
    after = await store.stats()
    assert len({r.id for r in results}) == n
    assert after["rows_put"] - before["rows_put"] == n
    commits = after["commits"] - before["commits"] - 1  # the second stats() is one
    assert 1 <= commits <= n // 10, commits


async def test_wait_for_work_wakes_on_put(store: Store) -> None:
    assert await store.due(Queue.UPLINK, limit=1) == []
    start = time.monotonic()
    await store.wait_for_work(Queue.UPLINK, 0.05)  # nothing came: times out
    assert time.monotonic() - start >= 0.04

    async def later() -> None:
        await asyncio.sleep(0.05)
        await put(store, "m1")

    producer = asyncio.create_task(later(), name="test-producer")
    start = time.monotonic()
    await store.wait_for_work(Queue.UPLINK, 10)
    assert time.monotonic() - start < 5
    await producer
    # Work that arrived after the last due() is not waited for.
    await put(store, "m2", "other")
    await store.wait_for_work(Queue.UPLINK, 10)
    assert len(await store.due(Queue.UPLINK, limit=10)) == 2


async def test_purge_and_prune(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db, dedup_window=100))
    try:
        a, b, c = [await put(store, k, k) for k in ("a", "b", "c")]
        await store.dead(a, reason="400")
        await store.dead(b, reason="400")
        await store.done(c)
        assert await store.purge(queue=Queue.DOWNLINK) == 0
        assert await store.purge(queue=None, older_than=3600) == 0  # too young
        assert await store.purge(queue=Queue.UPLINK) == 2
        assert await store.prune(time.time()) == 0  # within the dedup window
        assert await store.prune(time.time() + 101) == 1
        # The tombstone is gone: the key is new again.
        again = await store.put(Queue.UPLINK, msg_id="c", dedup_key="c", lane="c", body={})
        assert not again.duplicate
    finally:
        await store.close()


async def test_routes_and_learned_devices_persist(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db))
    origin = {"addrType": "AS", "addr": "as-1"}
    await store.remember_route("ue-1", origin, ttl=60)
    assert await store.learn_device("mqtt", "dev-1", "ue-1@iot")
    assert not await store.learn_device("mqtt", "dev-1", "ue-1@iot")
    assert await store.learn_device("mqtt", "dev-1", "ue-9@iot")  # changed: register again
    await store.close()

    store = await Store.open(StoreSettings(path=db))
    try:
        assert await store.route("ue-1") == origin
        assert await store.route("ue-1", now=time.time() + 61) is None
        assert await store.route("ue-2") is None
        assert await store.learned_devices() == [("mqtt", "dev-1", "ue-9@iot")]
    finally:
        await store.close()


async def test_unsent_work_survives_close(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db))
    ids = [await put(store, f"m{i}", "a") for i in range(3)]
    await store.close()
    store = await Store.open(StoreSettings(path=db))
    try:
        (head,) = await store.due(Queue.UPLINK, limit=10)
        assert head.id == ids[0]
        assert (await store.stats())["backlog"]["messages"] == 3
    finally:
        await store.close()


_CRASH_SCRIPT = """
import asyncio, sys
from pathlib import Path
from gatewayd.store import Queue, Store, StoreSettings

async def main():
    store = await Store.open(StoreSettings(path=Path(sys.argv[1]), synchronous=sys.argv[3]))
    run = sys.argv[2]

    async def producer(p):
        for i in range(1_000_000):
            key = f"{run}-{p}-{i}"
            r = await store.put(
                Queue.UPLINK, msg_id=key, dedup_key=key, lane=f"dev{p}", body={"n": i}
            )
            sys.stdout.write(f"ACK {r.id} {key}\\n")
            sys.stdout.flush()

    await asyncio.gather(*(producer(p) for p in range(8)))

asyncio.run(main())
"""


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_kill_9_loses_nothing_acked(db: Path, synchronous: str) -> None:
    rng = random.Random(5)
    acked: dict[int, str] = {}
    for run in range(3):
        proc = subprocess.Popen(  # noqa: ASYNC220 - the test is about this child
            [sys.executable, "-c", _CRASH_SCRIPT, str(db), f"r{run}", synchronous],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        kill_after = rng.randint(50, 1500)
        seen = 0
        for line in proc.stdout:
            if line.startswith("ACK "):
                _, item_id, key = line.split()
                acked[int(item_id)] = key
                seen += 1
                if seen >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
        # Lines already written before the kill were acked too.
        rest, _ = proc.communicate(timeout=30)
        for line in rest.splitlines():
            if line.startswith("ACK "):
                _, item_id, key = line.split()
                acked[int(item_id)] = key
        assert proc.returncode == -signal.SIGKILL

    store = await Store.open(StoreSettings(path=db))
    try:
        items = await store.list_items(queue=Queue.UPLINK, state=None, limit=1_000_000)
        stored = {i.id: i.msg_id for i in items}
        missing = {i: k for i, k in acked.items() if stored.get(i) != k}
        assert not missing, f"{len(missing)} acked messages lost"
        assert (await store.stats())["backlog"]["messages"] == len(stored)
    finally:
        await store.close()


async def test_transport_kv_persists_per_transport_and_expires(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db))
    sms, other = StoreKV(store, "sms"), StoreKV(store, "sms2")
    await sms.put_many({"mt:m1": '{"ids":["7"]}', "id:n:7": "m1"}, ttl=60)
    await sms.put("short", "x", ttl=0.05)
    await other.put("mt:m1", "not sms's", ttl=60)
    await store.close()

    store = await Store.open(StoreSettings(path=db))
    try:
        sms, other = StoreKV(store, "sms"), StoreKV(store, "sms2")
        assert await sms.get_many(["mt:m1", "id:n:7", "absent"]) == {
            "mt:m1": '{"ids":["7"]}',
            "id:n:7": "m1",
        }
        assert await other.get("mt:m1") == "not sms's"
        await asyncio.sleep(0.1)
        assert await sms.get("short") is None  # expired, even before a prune
        await sms.put("mt:m1", "replaced", ttl=60)
        assert await sms.get("mt:m1") == "replaced"
        await sms.delete(["mt:m1", "never-set"])
        assert await sms.get("mt:m1") is None
        await store.prune(now=time.time() + 61)

        def rows() -> int:
            conn = sqlite3.connect(db)
            try:
                return int(conn.execute("SELECT count(*) FROM kv").fetchone()[0])
            finally:
                conn.close()

        assert await asyncio.to_thread(rows) == 0
    finally:
        await store.close()


async def test_a_version_1_store_gains_the_kv_table(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE routes (service_id TEXT PRIMARY KEY, origin TEXT NOT NULL,"
        " expires REAL NOT NULL); PRAGMA user_version = 1;"
    )
    conn.close()
    store = await Store.open(StoreSettings(path=db))
    try:
        await StoreKV(store, "sms").put("k", "v", ttl=60)
        assert await StoreKV(store, "sms").get("k") == "v"
    finally:
        await store.close()


# --- the in-memory lane index (Store.take) ----------------------------------------------


async def test_take_hands_out_lane_heads_from_memory(store: Store) -> None:
    a1, b1, a2 = (
        await put(store, "a1", "a"),
        await put(store, "b1", "b"),
        await put(store, "a2", "a"),
    )
    commits = store._writer.commits
    first = await store.take(Queue.UPLINK, limit=10)
    assert [i.id for i in first] == [a1, b1]  # one per lane, oldest first
    assert first[0].body == {"msgId": "a1"}
    assert await store.take(Queue.UPLINK, limit=10) == []  # both lanes are out
    assert store._writer.commits == commits  # no query
    store.done_soon(first[0])  # the lane's next goes at once, before the commit
    (second,) = await store.take(Queue.UPLINK, limit=10)
    assert second.id == a2
    store.release(second.id)  # a cancelled send: the head goes again
    (again,) = await store.take(Queue.UPLINK, limit=10)
    assert again.id == a2
    await store.dead(first[1].id, reason="400")
    await store.stats()  # a transaction: the done rode on it
    done = await store.get(a1)
    assert done is not None
    assert done.state == "done"


async def test_take_after_a_retry_waits_for_not_before(store: Store) -> None:
    now = time.time()
    first = await put(store, "r1")
    await put(store, "r2")
    (item,) = await store.take(Queue.UPLINK, limit=5, now=now)
    await store.retry_later(item.id, not_before=now + 30, error="503")
    store.release(item.id)  # what the worker does after settling: nothing to release
    assert await store.take(Queue.UPLINK, limit=5, now=now + 29) == []
    (again,) = await store.take(Queue.UPLINK, limit=5, now=now + 31)
    assert (again.id, again.attempts, again.last_error) == (first, 1, "503")


async def test_take_reads_bodies_it_does_not_keep_and_survives_a_reopen(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db))
    ids = [await put(store, f"m{i}", f"d{i % 3}") for i in range(6)]
    await store.close()
    store = await Store.open(StoreSettings(path=db))  # the index comes from disk
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


async def test_take_sees_another_processs_changes(db: Path, store: Store) -> None:
    a = await put(store, "x1", "x")
    (item,) = await store.take(Queue.UPLINK, limit=5)
    await store.dead(item.id, reason="400")
    other = await Store.open(StoreSettings(path=db))  # the queue CLI, say
    try:
        assert await other.replay(a)
    finally:
        await other.close()
    await store.stats()  # our next transaction notices the other connection's commit
    (back,) = await store.take(Queue.UPLINK, limit=5)
    assert back.id == a


async def test_expiry_leaves_a_taken_item_and_holds_the_rest(store: Store) -> None:
    now = time.time()
    sending = await put(store, "e1", "e", expires_at=now + 1)
    waiting = await put(store, "f1", "f", expires_at=now + 1)
    (item,) = await store.take(Queue.UPLINK, limit=1)
    assert item.id == sending
    expired = await store.expire(now + 2)
    assert [i.id for i in expired] == [waiting]
    store.done_soon(item)
    assert await store.take(Queue.UPLINK, limit=5) == []


async def test_routes_are_read_from_memory_and_survive_a_reopen(db: Path) -> None:
    store = await Store.open(StoreSettings(path=db))
    await store.remember_route("ue-1", {"addrType": "AS", "addr": "as-1"}, ttl=60)
    commits = store._writer.commits
    assert await store.route("ue-1") == {"addrType": "AS", "addr": "as-1"}
    assert await store.route("ue-1", now=time.time() + 61) is None  # expired
    assert store._writer.commits == commits  # no transaction
    await store.close()
    store = await Store.open(StoreSettings(path=db))
    try:
        assert await store.route("ue-1") == {"addrType": "AS", "addr": "as-1"}
        await store.prune(time.time() + 61)
        assert store._routes == {}
    finally:
        await store.close()
