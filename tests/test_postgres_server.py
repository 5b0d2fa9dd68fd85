"""The test kit's PostgreSQL server (gatewayd_testing.postgres): the store's tests rely on
it being real, password-protected, TLS-only when asked, durable across a crash, unprivileged
and gone when stopped."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from gatewayd_testing import Pki, PostgresServer
from gatewayd_testing.postgres import PASSWORD, USER, alive


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A password from the environment or a ~/.pgpass would make a refusal test pass for
    # the wrong reason, or a client certificate in ~/.postgresql change the handshake.
    for name in ("PGPASSWORD", "PGSSLMODE", "PGSSLCERT", "PGSSLKEY", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # the real uid; effective and saved follow it
    raise AssertionError(f"no Uid line for {pid}")


def test_fixture_database_accepts_the_password(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        user, database, tables = conn.execute(
            "SELECT current_user, current_database(),"
            " (SELECT count(*) FROM pg_tables WHERE schemaname = 'public')"
        ).fetchone() or (None, None, None)
        assert conn.info.host == "127.0.0.1"
    assert user == USER
    assert database.startswith("test_"), "each test gets a database of its own"
    assert tables == 0, "and it is empty"


def test_a_wrong_or_missing_password_is_refused(postgres_server: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_server.dsn(password=False), password="not-" + PASSWORD)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(postgres_server.dsn(password=False))


def test_the_server_runs_unprivileged(postgres_server: PostgresServer) -> None:
    pid = postgres_server.pid
    assert pid is not None
    uid = _uid(pid)
    if os.geteuid() == 0:
        # PostgreSQL refuses root: the kit runs it as the Debian package's user.
        assert uid != 0
        assert uid == postgres_server.home.stat().st_uid
    else:
        assert uid == os.geteuid()
    assert all(_uid(p) == uid for p in postgres_server.processes() if alive(p))
    assert postgres_server.execute("SHOW fsync") == [("on",)], "durability is tested for real"


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Callable[..., PostgresServer]]:
    """A started server of the test's own (one it may stop or kill), closed at the end."""
    made: list[PostgresServer] = []

    def make(**options: Any) -> PostgresServer:
        server = PostgresServer(tmp_path / f"pg{len(made)}", **options)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.close()


def test_tls_verify_full_works_and_plain_tcp_is_refused(
    own_server: Callable[..., PostgresServer], loopback_pki: Pki
) -> None:
    server = own_server(
        tls=(loopback_pki["server"], loopback_pki["server_key"], loopback_pki["ca"])
    )
    dsn = server.dsn()
    assert "sslmode=verify-full" in dsn
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)
    key = server.home / "server.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.stat().st_uid == _uid(server.processes()[0])
    with pytest.raises(psycopg.OperationalError, match=r"no encryption|rejects connection"):
        psycopg.connect(server.dsn(password=False), password=PASSWORD, sslmode="disable")


def test_a_killed_server_starts_again_with_its_data(
    own_server: Callable[..., PostgresServer],
) -> None:
    server = own_server()
    port, first = server.port, server.pid
    dsn = server.create_database("durable")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('before the crash')")
        # An idle backend when the postmaster dies: kill() waits for it to go.
        with psycopg.connect(dsn, autocommit=True) as idle:
            idle.execute("SELECT 1")
            processes = server.processes()
            assert len(processes) > 1
            server.kill()
    assert not any(alive(p) for p in processes)
    server.start()
    assert server.pid != first
    assert server.port == port
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("before the crash",)]
    server.restart()
    assert server.execute("SELECT v FROM kept", database="durable") == [("before the crash",)]


def test_stop_leaves_no_process_behind(
    own_server: Callable[..., PostgresServer], tmp_path: Path
) -> None:
    server = own_server()
    pid = server.pid
    processes = server.processes()
    assert len(processes) > 1, "the checkpointer, the WAL writer... run under it"
    server.stop()
    assert server.pid is None
    assert not server.running
    assert server.processes() == []
    assert not Path(f"/proc/{pid}").exists()
    assert not any(alive(p) for p in processes)
    assert not (server.data / "postmaster.pid").exists(), "a clean shutdown"
    server.close()
    assert not server.home.exists() or server.home.is_relative_to(tmp_path), (
        "close() removes a server directory made outside the test's"
    )
