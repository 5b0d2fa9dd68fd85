"""The store's behaviour, one suite for every backend: SQLite files and a real PostgreSQL
server (started by the test kit). Commit, dedup, order, expiry, limits, crashes.

Backend-specific behaviour lives in test_store_sqlite.py and test_store_postgres.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from gatewayd.errors import BacklogFullError
from gatewayd.store import Item, PutRequest, Queue, Store, StoreSettings, open_store
from gatewayd.store.kv import StoreKV

ROOT = Path(__file__).resolve().parents[1]


Settings = Callable[..., StoreSettings]


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings of one store (the same data on every call), with overrides."""
    if request.param == "sqlite":
        return lambda **kw: StoreSettings(path=tmp_path / "store.db", **kw)
    dsn: str = request.getfixturevalue("postgres_dsn")
    return lambda **kw: StoreSettings(
        path=tmp_path / "unused.db", backend="postgresql", dsn=dsn, **kw
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    store = await open_store(settings())
    yield store
    await store.close()


def _as_json(settings: StoreSettings) -> str:
    return json.dumps(
        {
            "path": str(settings.path),
            "synchronous": settings.synchronous,
            "backend": settings.backend,
            "dsn": settings.dsn,
        }
    )


def count_rows(settings: StoreSettings, table: str) -> int:
    """Rows in one of the store's tables, read behind its back."""
    query = f"SELECT count(*) FROM {table}"  # noqa: S608 - a test's constant table name
    if settings.backend == "sqlite":
        conn = sqlite3.connect(settings.path)
        try:
            return int(conn.execute(query).fetchone()[0])
        finally:
            conn.close()
    with psycopg.connect(settings.dsn or "") as pg:
        row = pg.execute(query.encode()).fetchone()
        assert row is not None
        return int(row[0])


async def heads(store: Store, queue: Queue = Queue.UPLINK, **kw: Any) -> list[int]:
    """The lane heads due now (or at ``now``), handed back at once."""
    items = await store.take(queue, limit=kw.pop("limit", 10), **kw)
    for item in items:
        store.release(item.id)
    return [item.id for item in items]


async def put(store: Store, key: str, lane: str = "dev-1", **kw: object) -> int:
    result = await store.put(
        Queue.UPLINK, msg_id=key, dedup_key=key, lane=lane, body={"msgId": key}, **kw
    )
    assert not result.duplicate
    return result.id


async def test_put_commits_and_dedups_across_reopen(settings: Settings) -> None:
    store = await open_store(settings())
    first = await store.put(
        Queue.UPLINK, msg_id="m1", dedup_key="dev-1/7", lane="dev-1", body={"payload": "hé"}
    )
    again = await store.put(
        Queue.UPLINK, msg_id="m1-other", dedup_key="dev-1/7", lane="dev-1", body={}
    )
    assert (again.id, again.duplicate, first.duplicate) == (first.id, True, False)
    await store.close()

    store = await open_store(settings())
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

    assert await heads(store) == [a1, b1, c1]  # a2 waits behind a1
    (first,) = await store.take(Queue.UPLINK, limit=1)
    assert first.id == a1
    assert await heads(store) == [b1, c1]  # lane a is out until a1 is settled
    store.release(a1)
    assert await heads(store, Queue.DOWNLINK) == []

    await store.done(a1)
    assert await heads(store) == [b1, a2, c1]
    # A dead head also frees its lane.
    await store.dead(a2, reason="permanent: 400")
    assert await heads(store) == [b1, c1]


async def test_retry_later_holds_the_lane_until_not_before(store: Store) -> None:
    first = await put(store, "a1", "a")
    await put(store, "a2", "a")
    now = time.time()
    await store.retry_later(first, not_before=now + 60, error="503")
    # The head is not due, and its successor must not overtake it.
    assert await heads(store, now=now) == []
    (item,) = await store.take(Queue.UPLINK, limit=10, now=now + 61)
    assert (item.id, item.attempts, item.last_error) == (first, 1, "503")


async def test_expiry_by_exprtime_and_max_age(settings: Settings) -> None:
    store = await open_store(settings(max_age=3600))
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
    (item,) = await store.take(Queue.UPLINK, limit=10)
    assert (item.id, item.msg_id, item.attempts, item.state) == (item_id, "m-42", 0, "pending")
    assert item.expires_at is None  # or it would die again at once
    assert await store.expire() == []


async def test_backlog_full_by_count_refuses_and_stores_nothing(settings: Settings) -> None:
    store = await open_store(settings(max_messages=3))
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


async def test_one_key_twice_in_a_batch_is_stored_once(store: Store) -> None:
    # The second request is a duplicate of the first, not a failed batch.
    twice = [PutRequest(msg_id="a", dedup_key="k", lane="d", body={"n": n}) for n in (1, 2)]
    first, second = await store.put_many(Queue.UPLINK, twice)
    assert not first.duplicate
    assert second.duplicate
    assert second.id == first.id
    (item,) = await store.list_items(queue=None, state="pending", limit=10)
    assert item.body == {"n": 1}
    assert (await store.stats())["backlog"]["messages"] == 1


async def test_ids_with_nul_and_the_escape_character_round_trip(store: Store) -> None:
    # Valid JSON and valid to the 3GPP schema: the server may send such a msgId.
    # PostgreSQL's text cannot hold U+0000; its store escapes it (gatewayd.store.pg_text),
    # and U+E000, its escape character, must come back as itself too.
    odd = "a\x00b\ue000c\ue0000"
    first = await store.put(
        Queue.DOWNLINK, msg_id=odd, dedup_key=f"k{odd}", lane=f"d{odd}", body={}
    )
    again = await store.put(
        Queue.DOWNLINK, msg_id=odd, dedup_key=f"k{odd}", lane=f"d{odd}", body={}
    )
    plain = await store.put(Queue.DOWNLINK, msg_id="p", dedup_key="ka", lane="d", body={})
    assert (again.duplicate, again.id) == (True, first.id)
    assert not plain.duplicate  # no collision with a string the escaping might produce
    items = await store.take(Queue.DOWNLINK, limit=10)
    assert {(i.msg_id, i.lane) for i in items} == {(odd, f"d{odd}"), ("p", "d")}
    for item in items:
        store.done_soon(item)
    (done,) = [
        i for i in await store.list_items(queue=None, state=None, limit=10) if i.id == first.id
    ]
    assert done.msg_id == odd


async def test_backlog_full_by_bytes(settings: Settings) -> None:
    store = await open_store(settings(max_bytes=1000))
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


async def test_disk_full_refuses_then_recovers(store: Store) -> None:
    # Incompressible, so each row takes its room on disk (PostgreSQL compresses values).
    body = {"payload": random.Random(1).randbytes(1500).hex()}
    await store.limit_size(256 * 1024 + (await store.stats())["db_bytes"])
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
    assert store.refusing == "disk", refused
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
    assert await heads(store) == []
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
    # Work that arrived after the last take() is not waited for.
    await put(store, "m2", "other")
    await store.wait_for_work(Queue.UPLINK, 10)
    assert len(await heads(store)) == 2


async def test_purge_and_prune(settings: Settings) -> None:
    store = await open_store(settings(dedup_window=100))
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


async def test_routes_and_learned_devices_persist(settings: Settings) -> None:
    store = await open_store(settings())
    origin = {"addrType": "AS", "addr": "as-1"}
    await store.remember_route("ue-1", origin, ttl=60)
    assert await store.learn_device("mqtt", "dev-1", "ue-1@iot")
    assert not await store.learn_device("mqtt", "dev-1", "ue-1@iot")
    assert await store.learn_device("mqtt", "dev-1", "ue-9@iot")  # changed: register again
    await store.close()

    store = await open_store(settings())
    try:
        assert await store.route("ue-1") == origin
        assert await store.route("ue-1", now=time.time() + 61) is None
        assert await store.route("ue-2") is None
        assert await store.learned_devices() == [("mqtt", "dev-1", "ue-9@iot")]
    finally:
        await store.close()


async def test_unsent_work_survives_close(settings: Settings) -> None:
    store = await open_store(settings())
    ids = [await put(store, f"m{i}", "a") for i in range(3)]
    await store.close()
    store = await open_store(settings())
    try:
        (head,) = await store.take(Queue.UPLINK, limit=10)
        assert head.id == ids[0]
        assert (await store.stats())["backlog"]["messages"] == 3
    finally:
        await store.close()


_CRASH_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from gatewayd.store import Queue, StoreSettings, open_store

async def main():
    given = json.loads(sys.argv[1])
    store = await open_store(StoreSettings(**{**given, "path": Path(given["path"])}))
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
async def test_kill_9_loses_nothing_acked(settings: Settings, synchronous: str) -> None:
    rng = random.Random(5)
    acked: dict[int, str] = {}
    for run in range(3):
        proc = subprocess.Popen(  # noqa: ASYNC220 - the test is about this child
            [
                sys.executable,
                "-c",
                _CRASH_SCRIPT,
                _as_json(settings(synchronous=synchronous)),
                f"r{run}",
            ],
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

    store = await open_store(settings())
    try:
        items = await store.list_items(queue=Queue.UPLINK, state=None, limit=1_000_000)
        stored = {i.id: i.msg_id for i in items}
        missing = {i: k for i, k in acked.items() if stored.get(i) != k}
        assert not missing, f"{len(missing)} acked messages lost"
        assert (await store.stats())["backlog"]["messages"] == len(stored)
    finally:
        await store.close()


async def test_transport_kv_persists_per_transport_and_expires(settings: Settings) -> None:
    store = await open_store(settings())
    sms, other = StoreKV(store, "sms"), StoreKV(store, "sms2")
    await sms.put_many({"mt:m1": '{"ids":["7"]}', "id:n:7": "m1"}, ttl=60)
    await sms.put("short", "x", ttl=0.05)
    await other.put("mt:m1", "not sms's", ttl=60)
    await store.close()

    store = await open_store(settings())
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

        assert await asyncio.to_thread(count_rows, settings(), "kv") == 0
    finally:
        await store.close()


async def take_soon(store: Store, queue: Queue = Queue.UPLINK) -> list[Item]:
    """What a sender gets once the settlements it waits for have committed."""
    deadline = time.monotonic() + 10
    while not (items := await store.take(queue, limit=10)) and time.monotonic() < deadline:
        await store.wait_for_work(queue, 0.1)
    return items


async def test_take_hands_out_lane_heads(store: Store) -> None:
    a1, b1, a2 = (
        await put(store, "a1", "a"),
        await put(store, "b1", "b"),
        await put(store, "a2", "a"),
    )
    first = await store.take(Queue.UPLINK, limit=10)
    assert [i.id for i in first] == [a1, b1]  # one per lane, oldest first
    assert first[0].body == {"msgId": "a1"}
    assert await store.take(Queue.UPLINK, limit=10) == []  # both lanes are out
    store.done_soon(first[0])  # the lane's next goes once that is written
    (second,) = await take_soon(store)
    assert second.id == a2
    store.release(second.id)  # a cancelled send: the head goes again
    (again,) = await take_soon(store)
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


async def test_take_sees_another_processs_changes(settings: Settings, store: Store) -> None:
    a = await put(store, "x1", "x")
    (item,) = await store.take(Queue.UPLINK, limit=5)
    await store.dead(item.id, reason="400")
    other = await open_store(settings())  # the queue CLI, say
    try:
        assert await other.replay(a)
    finally:
        await other.close()
    await store.stats()  # our next transaction notices the other connection's commit
    (back,) = await take_soon(store)
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
    await store.stats()  # the done rode on it
    assert await store.take(Queue.UPLINK, limit=5) == []
