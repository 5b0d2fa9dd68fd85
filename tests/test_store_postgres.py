"""What only the shared PostgreSQL store does: several instances on one database.

One item in flight per lane across instances, takeover after a SIGKILL within the
lease, wake-ups between instances through LISTEN/NOTIFY, migrations under a lock, the
password by reference and TLS to the database, and intake refused (then recovering by
itself) while the database is away. The behaviour every backend shares is in
test_store.py; these run against the test kit's real PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest
import structlog
from gatewayd_sim.harness import Pki
from gatewayd_testing import until
from gatewayd_testing.postgres import PASSWORD, PostgresServer
from psycopg import errors as pg_errors

from gatewayd import config
from gatewayd.errors import BacklogFullError, ConfigError, StoreError
from gatewayd.options import SecretRef
from gatewayd.store import PutRequest, Queue, StoreSettings, pg_text
from gatewayd.store.pg_schema import MIGRATIONS
from gatewayd.store.pg_tx import Tx
from gatewayd.store.postgres import PostgresStore

Open = Callable[..., "asyncio.Future[PostgresStore]"]


@pytest.fixture
def settings(postgres_dsn: str, tmp_path: Path) -> Callable[..., StoreSettings]:
    return lambda **kw: StoreSettings(
        path=tmp_path / "unused.db", backend="postgresql", dsn=postgres_dsn, **kw
    )


@pytest.fixture
async def pair(
    settings: Callable[..., StoreSettings],
) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two instances on one database, with a short lease."""
    a = await PostgresStore.open(settings(lease=1.5))
    b = await PostgresStore.open(settings(lease=1.5))
    yield a, b
    await a.close()
    await b.close()


async def put(store: PostgresStore, key: str, lane: str) -> int:
    result = await store.put(Queue.UPLINK, msg_id=key, dedup_key=key, lane=lane, body={"k": key})
    assert not result.duplicate
    return result.id


async def test_a_lane_has_one_item_in_flight_across_instances(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    a1 = await put(a, "a1", "dev-a")
    await put(b, "a2", "dev-a")
    b1 = await put(b, "b1", "dev-b")
    (first,) = await a.take(Queue.UPLINK, limit=1)
    assert first.id == a1
    # B gets the other lane, never dev-a's second message while its first is out.
    assert [i.id for i in await b.take(Queue.UPLINK, limit=10)] == [b1]
    assert await b.take(Queue.UPLINK, limit=10) == []
    await a.done(first.id)
    (second,) = await b.take(Queue.UPLINK, limit=10)
    assert second.msg_id == "a2"


async def test_concurrent_takers_never_share_a_lane(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """Both instances drain 20 lanes of 10 messages at once: each lane's messages are
    handed out one at a time and in order, whoever holds it."""
    a, b = pair
    for n in range(10):
        await a.put_many(
            Queue.UPLINK,
            [
                PutRequest(msg_id=f"{d}-{n}", dedup_key=f"{d}-{n}", lane=f"d{d}", body={})
                for d in range(20)
            ],
        )
    in_flight: set[str] = set()
    order: dict[str, list[int]] = {}

    async def drain(store: PostgresStore) -> None:
        idle = 0
        while idle < 20:
            items = await store.take(Queue.UPLINK, limit=8)
            if not items:
                idle += 1
                await store.wait_for_work(Queue.UPLINK, 0.05)
                continue
            idle = 0
            for item in items:
                assert item.lane not in in_flight, f"{item.lane} handed out twice"
                in_flight.add(item.lane)
            await asyncio.sleep(0.001)
            for item in items:
                order.setdefault(item.lane, []).append(int(item.msg_id.split("-")[1]))
                in_flight.discard(item.lane)
                await store.done(item.id)

    await asyncio.gather(drain(a), drain(b))
    assert order == {f"d{d}": list(range(10)) for d in range(20)}


_HOLDER = """
import asyncio, json, sys
from pathlib import Path
from gatewayd.store import Queue, StoreSettings
from gatewayd.store.postgres import PostgresStore

async def main():
    store = await PostgresStore.open(StoreSettings(
        path=Path("unused.db"), backend="postgresql", dsn=sys.argv[1], lease=float(sys.argv[2])))
    items = await store.take(Queue.UPLINK, limit=10)
    print(json.dumps([i.id for i in items]), flush=True)
    await asyncio.sleep(3600)  # holding them, until SIGKILL

asyncio.run(main())
"""


async def test_a_killed_instances_lanes_are_taken_over_after_the_lease(
    settings: Callable[..., StoreSettings], postgres_dsn: str
) -> None:
    lease = 2.0
    survivor = await PostgresStore.open(settings(lease=lease))
    try:
        ids = [await put(survivor, f"m{n}", f"dev{n}") for n in range(3)]
        holder = subprocess.Popen(  # noqa: ASYNC220 - the instance under test
            [sys.executable, "-c", _HOLDER, postgres_dsn, str(lease)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            line = ""
            while not line.startswith("["):  # after the store's own log lines
                line = await asyncio.to_thread(holder.stdout.readline)
                assert line, "the holder ended early"
            held = json.loads(line)
            assert sorted(held) == ids
            assert await survivor.take(Queue.UPLINK, limit=10) == []  # held by a live one
            holder.send_signal(signal.SIGKILL)
            killed = time.monotonic()
        finally:
            holder.kill()
            holder.communicate()
        with structlog.testing.capture_logs() as logs:
            taken: list[int] = []
            while len(taken) < 3 and time.monotonic() - killed < lease + 10:
                taken += [i.id for i in await survivor.take(Queue.UPLINK, limit=10)]
                await survivor.wait_for_work(Queue.UPLINK, 0.1)
        took = time.monotonic() - killed
        assert sorted(taken) == ids  # at least once, same ids (and msgIds)
        # Taken over once the lease ran out, not before, and not much after.
        assert lease - 0.5 <= took <= lease + 3, took
        takeovers = [e for e in logs if e["event"] == "store.lane_taken_over"]
        assert len(takeovers) == 3
        assert all(e["previous"] != survivor.instance for e in takeovers)
    finally:
        await survivor.close()


async def test_a_clean_close_hands_its_lanes_over_at_once(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    await put(a, "m1", "dev")
    (item,) = await a.take(Queue.UPLINK, limit=1)
    await a.close()  # cancelled send: still pending, lease given back
    start = time.monotonic()
    (again,) = await b.take(Queue.UPLINK, limit=1)
    assert (again.id, time.monotonic() - start < 1) == (item.id, True)


async def test_a_put_on_one_instance_wakes_the_other(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    assert await b.take(Queue.DOWNLINK, limit=1) == []
    waiting = asyncio.ensure_future(b.wait_for_work(Queue.DOWNLINK, 10))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    start = time.monotonic()
    await a.put(Queue.DOWNLINK, msg_id="d", dedup_key="d", lane="dev", body={})
    await waiting
    assert time.monotonic() - start < 2  # by NOTIFY, not by the 10 s timeout


async def test_dedup_routes_devices_and_the_dlq_are_shared(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    first = await a.put(Queue.UPLINK, msg_id="m", dedup_key="dev/1", lane="dev", body={})
    again = await b.put(Queue.UPLINK, msg_id="m", dedup_key="dev/1", lane="dev", body={})
    assert (again.id, again.duplicate) == (first.id, True)
    await a.remember_route("ue-1", {"addrType": "AS", "addr": "as-1"}, ttl=60)
    assert await b.route("ue-1") == {"addrType": "AS", "addr": "as-1"}
    assert await a.learn_device("mqtt", "sensor-9", "ue-9@iot")
    assert not await b.learn_device("mqtt", "sensor-9", "ue-9@iot")
    assert await b.learned_devices() == [("mqtt", "sensor-9", "ue-9@iot")]
    await a.dead(first.id, reason="400")
    (dead,) = await b.list_items(queue=None, state="dead", limit=10)
    assert dead.id == first.id
    assert await b.replay(first.id)
    (back,) = await a.take(Queue.UPLINK, limit=1)
    assert back.id == first.id


async def test_parts_of_one_set_on_two_instances_assemble_once(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair

    def assemble(bodies: list[dict[str, object]]) -> PutRequest | None:
        if len(bodies) < 2:
            return None
        return PutRequest(msg_id="whole", dedup_key="whole", lane="dev", body={"n": len(bodies)})

    parts = [
        PutRequest(msg_id=f"p{n}", dedup_key=f"p{n}", lane="set-1", body={"n": n}) for n in (1, 2)
    ]
    results = await asyncio.gather(
        a.put_part(parts[0], into=Queue.DOWNLINK, assemble=assemble),
        b.put_part(parts[1], into=Queue.DOWNLINK, assemble=assemble),
    )
    wholes = [r.whole for r in results if r.whole is not None]
    assert len(wholes) == 1
    (item,) = await a.take(Queue.DOWNLINK, limit=5)
    assert item.msg_id == "whole"


async def test_instances_starting_together_migrate_once(
    settings: Callable[..., StoreSettings], postgres_server: PostgresServer
) -> None:
    with structlog.testing.capture_logs() as logs:
        stores = await asyncio.gather(*(PostgresStore.open(settings()) for _ in range(4)))
    for store in stores:
        await store.close()
    migrated = [e for e in logs if e["event"] == "store.migrated"]
    assert [e["version"] for e in migrated] == list(range(1, len(MIGRATIONS) + 1))


async def test_a_schema_newer_than_this_gatewayd_is_refused(
    settings: Callable[..., StoreSettings], postgres_dsn: str
) -> None:
    store = await PostgresStore.open(settings())
    await store.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO gatewayd_schema (version) VALUES (99)")
    with pytest.raises(StoreError, match="version 99"):
        await PostgresStore.open(settings())


async def test_an_unreachable_database_fails_the_start_naming_it(tmp_path: Path) -> None:
    dead = StoreSettings(
        path=tmp_path / "x.db", backend="postgresql", dsn="postgresql://gw@127.0.0.1:1/gatewayd"
    )
    with pytest.raises(StoreError, match=r"postgresql://gw@127\.0\.0\.1:1/gatewayd"):
        await PostgresStore.open(dead)


# --- configuration: the password by reference, TLS to a database elsewhere ------------


def _store_config(tmp_path: Path, store: str) -> config.Settings:
    from gatewayd_sim import harness

    tls = harness.make_pki(tmp_path / "pki")
    return harness.write_config(
        tmp_path / "gw.toml",
        harness.gateway_toml(
            tls,
            api_root="https://127.0.0.1:1",
            state_dir=tmp_path / "state",
            transports=harness.http_transport_bearer(),
            extra=f"[store]\n{store}",
        ),
    )


@pytest.mark.parametrize(
    ("store", "key", "problem"),
    [
        (
            'backend = "postgresql"\ndsn = "postgresql://gw:hunter2@db.example/gatewayd"\n',
            "store.dsn",
            "must not hold a password",
        ),
        (
            'backend = "postgresql"\ndsn = "postgresql://gw@db.example/gatewayd"\n',
            "store.dsn",
            "sslmode=verify-full",
        ),
        (
            'backend = "postgresql"\ndsn = "host=db.example sslmode=require"\n',
            "store.dsn",
            "verify-full",
        ),
        (
            'backend = "postgresql"\ndsn = "postgresql://gw@127.0.0.1/g"\npassword = "x"\n',
            "store.password",
            "inline",
        ),
        ('backend = "postgresql"\n', "store.dsn", "required"),
        ('backend = "mysql"\n', "store.backend", "sqlite"),
    ],
)
def test_store_config_errors_name_the_key(
    tmp_path: Path, store: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        _store_config(tmp_path, store)
    assert key in str(refused.value)
    assert problem in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_a_database_elsewhere_with_verify_full_and_a_password_file(tmp_path: Path) -> None:
    settings = _store_config(
        tmp_path,
        'backend = "postgresql"\n'
        'dsn = "postgresql://gw@db.example:5433/gatewayd?sslmode=verify-full&sslrootcert=/etc/ca.pem"\n'
        'password = { file = "db-password" }\nlease = 10\n',
    )
    assert settings.store.backend == "postgresql"
    assert settings.store.password == SecretRef("file", str(tmp_path / "db-password"))
    assert settings.store.lease == 10.0
    assert "db-password" not in repr(settings.store.dsn)


async def test_tls_to_the_database_with_the_password_by_reference(
    tmp_path: Path, loopback_pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS-only server (plain TCP refused): the store connects with verify-full, its
    password read from the environment variable the config names."""
    server = PostgresServer(
        tmp_path / "pg",
        tls=(
            Path(loopback_pki["server"]),
            Path(loopback_pki["server_key"]),
            Path(loopback_pki["ca"]),
        ),
    )
    server.start()
    try:
        monkeypatch.setenv("GATEWAYD_TEST_DB_PASSWORD", PASSWORD)
        settings = StoreSettings(
            path=tmp_path / "unused.db",
            backend="postgresql",
            dsn=server.dsn(password=False),
            password=SecretRef("env", "GATEWAYD_TEST_DB_PASSWORD", "store.password"),
        )
        assert "sslmode=verify-full" in (settings.dsn or "")
        store = await PostgresStore.open(settings)
        try:
            await store.put(Queue.UPLINK, msg_id="m", dedup_key="m", lane="d", body={})
            (ssl,) = server.execute(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)"
                " WHERE ssl AND application_name = 'gatewayd'"
            )
            assert ssl[0] >= 1
        finally:
            await store.close()
        monkeypatch.setenv("GATEWAYD_TEST_DB_PASSWORD", "wrong")
        with pytest.raises(StoreError, match="password authentication failed"):
            await PostgresStore.open(settings)
    finally:
        server.close()


async def test_intake_is_refused_while_the_database_is_away_then_recovers(
    tmp_path: Path,
) -> None:
    """Its own server, stopped and started under the store: puts are refused with a
    retry hint while it is away (nothing half-stored), and succeed again by themselves."""
    server = PostgresServer(tmp_path / "pg")
    server.start()
    store = await PostgresStore.open(
        StoreSettings(path=tmp_path / "unused.db", backend="postgresql", dsn=server.dsn())
    )
    try:
        acked = [await put(store, f"before{n}", "dev") for n in range(5)]
        server.stop()
        with structlog.testing.capture_logs() as logs, pytest.raises(BacklogFullError) as refused:
            await put(store, "away", "dev")
        assert refused.value.retry_after is not None
        assert store.refusing == "unavailable"
        assert "store.full" in [e["event"] for e in logs]
        server.start()

        async def stored_again() -> bool:
            try:
                acked.append(await put(store, f"after{len(acked)}", "dev"))
            except BacklogFullError:
                return False
            return True

        await until(stored_again, timeout=30, what="a put after the restart")
        assert store.refusing is None
        items = await store.list_items(queue=Queue.UPLINK, state="pending", limit=100)
        assert [i.id for i in items] == acked  # everything acknowledged, nothing refused
    finally:
        await store.close()
        server.close()


async def test_the_queue_cli_works_on_the_shared_store(
    tmp_path: Path, postgres_server: PostgresServer, settings: Callable[..., StoreSettings]
) -> None:
    """``gatewayd queue --config``: the dead-letter queue and its replay are the
    cluster's, reached with the password by reference like the daemon."""
    store = await PostgresStore.open(settings())
    try:
        first = await put(store, "m-dead", "dev")
        await store.dead(first, reason="400 from the server")
    finally:
        await store.close()
    name = (settings().dsn or "").rsplit("/", 1)[1].split("?")[0]
    dsn = postgres_server.dsn(name, password=False)
    config = tmp_path / "gw.toml"
    config.write_text(
        f"""[gateway]
id = "urn:gatewayd:gateway:t"
type = "N3G"
[northbound]
api_root = "https://127.0.0.1:9"
credentials = "nb"
server_identity = "localhost"
[api]
listen = "127.0.0.1:0"
[store]
backend = "postgresql"
dsn = "{dsn}"
password = {{ env = "GATEWAYD_TEST_DB_PASSWORD" }}
[credentials.nb]
plugin = "x509"
[transports.web]
plugin = "http"
[[transports.web.devices]]
device = "sensor-1"
service_id = "ue-sensor-1"
"""
    )
    env = {**os.environ, "GATEWAYD_TEST_DB_PASSWORD": PASSWORD}

    def queue(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gatewayd.queue_cli", "queue", *argv, "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=60,
        )

    listed = await asyncio.to_thread(queue, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["msg_id"] for r in json.loads(listed.stdout)] == ["m-dead"]
    retried = await asyncio.to_thread(queue, "retry", str(first))
    assert retried.returncode == 0, retried.stderr
    stats = await asyncio.to_thread(queue, "stats", "--json")
    assert json.loads(stats.stdout)["queues"]["uplink"]["pending"] == 1
    assert PASSWORD not in listed.stderr + stats.stdout + stats.stderr


async def test_a_transaction_rolled_back_for_a_deadlock_runs_again(
    settings: Callable[..., StoreSettings],
) -> None:
    """PostgreSQL breaks a deadlock by rolling one transaction back (SQLSTATE 40P01):
    that batch runs again, whole, and its callers see their results, not an error."""
    store = await PostgresStore.open(settings())
    runs = 0

    async def job(tx: Tx) -> str:
        nonlocal runs
        runs += 1
        await tx.run(
            "INSERT INTO kv (transport, key, value, expires) VALUES ('t', %s, 'v', 1e12)",
            (f"k{runs}",),
        )
        if runs == 1:
            raise pg_errors.DeadlockDetected("deadlock detected")
        return "done"

    try:
        assert await store._call(job) == "done"
        assert runs == 2
        # The first run's write was rolled back with it: only the second one's is kept.
        assert await store.kv_get("t", ["k1", "k2"]) == {"k2": "v"}
    finally:
        await store.close()


def test_text_escaping_is_one_to_one() -> None:
    # Every string over the characters that matter, up to length 5: unescape(escape(s))
    # is s, and no two strings share an escaped form (equal in SQL iff equal in Python).
    alphabet = ["a", "0", pg_text.NUL, pg_text.ESCAPE]
    strings = [""]
    for _ in range(5):
        strings += ["".join(p) for p in itertools.product(alphabet, repeat=len(strings[-1]) + 1)]
    escaped = {pg_text.escape(s): s for s in strings}
    assert len(escaped) == len(set(strings))
    for form, original in escaped.items():
        assert pg_text.NUL not in form
        assert pg_text.unescape(form) == original
    assert pg_text.escape("plain") == "plain"
