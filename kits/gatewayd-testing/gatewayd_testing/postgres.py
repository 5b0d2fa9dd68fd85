"""A real PostgreSQL server for the tests, from the Debian package's binaries.

:class:`PostgresServer` runs one server process on its own data directory: initdb'd with
a superuser ``gatewayd`` (password :data:`PASSWORD`, SCRAM-SHA-256 only) and a database
``gatewayd``, listening on 127.0.0.1 on a free port picked once (so :meth:`restart` and
:meth:`start` after :meth:`kill` come back on the same address) and on a unix socket in
the data directory. fsync stays on: the store's durability is what the tests are about.
With ``tls=(cert, key, ca)`` TCP clients must use TLS (``hostssl``; a plain TCP
connection is rejected), so a test can prove the store negotiated TLS.

PostgreSQL refuses to run as root. When the tests run as root, initdb and the server run
as the ``postgres`` user that the Debian package creates (``runuser -u postgres --``),
and the server's directory belongs to it. The binaries are looked for in
``/usr/lib/postgresql/<version>/bin`` (highest version); without them the server raises
:class:`PostgresMissing`, naming the Debian package, rather than skipping anything.

The fixtures ``postgres_server`` (one per session) and ``postgres_dsn`` (a fresh
database per test) are in :mod:`gatewayd_testing`. psycopg (3) is imported only when a
server is used, so the kit works without it for everyone else.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from psycopg.sql import Composed

__all__ = [
    "DEBIAN_PACKAGE",
    "PASSWORD",
    "USER",
    "PostgresMissing",
    "PostgresServer",
    "alive",
    "bindir",
]

USER = "gatewayd"  # the superuser initdb creates
PASSWORD = "gatewayd-test-pass"  # noqa: S105 - its password, for throw-away test servers only
DATABASE = "gatewayd"  # created on the first start
DEBIAN_PACKAGE = "postgresql"
SERVER_USER = "postgres"  # the unprivileged user the server runs as when we are root
_SEARCH = "/usr/lib/postgresql/*/bin"
# A unix socket path (sun_path) holds 107 bytes; the socket is "<data>/.s.PGSQL.<port>".
_SOCKET_PATH_MAX = 100


class PostgresMissing(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def bindir() -> Path:
    """The directory of the highest installed version's initdb and postgres."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for candidate in Path("/").glob(_SEARCH.lstrip("/")):
        version = candidate.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version) is None:
            continue
        if all(os.access(candidate / b, os.X_OK) for b in ("initdb", "postgres", "pg_isready")):
            found.append((tuple(int(p) for p in version.split(".")), candidate))
    if not found:
        raise PostgresMissing(
            f"no PostgreSQL server binaries (initdb, postgres) in {_SEARCH}: install the "
            f"Debian package {DEBIAN_PACKAGE!r} (as root: apt-get install {DEBIAN_PACKAGE}, "
            "or ./dev setup)"
        )
    return max(found)[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server process on its own data directory under ``directory``.

    ``tls`` is ``(cert_pem_path, key_pem_path, ca_pem_path)``: the server's certificate
    (for 127.0.0.1) and key, and the CA that clients verify it with (``verify-full``).
    """

    def __init__(
        self,
        directory: Path,
        *,
        tls: tuple[Path, Path, Path] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.bin = bindir()
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls: tuple[Path, Path, Path] | None = None
        if tls is not None:
            cert, key, ca = tls
            self.tls = (Path(cert).absolute(), Path(key).absolute(), Path(ca).absolute())
        self.start_timeout = start_timeout
        self.log_path = self.directory / "postgres.log"
        self._as = _server_user()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._outside: Path | None = None  # a server directory we made outside `directory`
        self.home = self._make_home()
        self.data = self.home / "data"
        try:
            self._initdb()
        except BaseException:
            self.close()
            raise
        self._created_database = False

    # -- lifecycle -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs (not runuser's, when root)."""
        return self._pid

    @property
    def running(self) -> bool:
        return self._pid is not None and alive(self._pid)

    def processes(self) -> list[int]:
        """The postmaster's pid and its children's (backends, checkpointer, ...), for a
        test to check later that they are all gone (:func:`alive`); empty when stopped."""
        pid = self._pid
        return [pid, *_children(pid)] if pid is not None and alive(pid) else []

    def start(self) -> None:
        """Start the server; return once it accepts connections on TCP."""
        if self.running:
            return
        self._reap()
        args = [str(self.bin / "postgres"), "-D", str(self.data)]
        for name, value in self._settings().items():
            args += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            # The log is ours (root's or the test user's): the server writes to the
            # inherited descriptor, so it needs no access to `directory`.
            self._proc = subprocess.Popen(
                self._as_server_user(args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C at the terminal is not a fast shutdown
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"postgres exited during start-up:\n{self.log_tail()}")
            if self._accepting():
                break
            if time.monotonic() > deadline:
                # By the postmaster's pid once it wrote it (as root our child is runuser,
                # which a SIGKILL would not let pass the signal on); before that, the
                # process group start_new_session made: runuser and the postmaster.
                with contextlib.suppress(OSError, ValueError):
                    self._pid = self._postmaster_pid()
                if self._pid is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self._proc.pid, signal.SIGKILL)
                self.kill()
                raise RuntimeError(
                    f"postgres did not accept connections within {self.start_timeout} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)
        self._pid = self._postmaster_pid()
        if not self._created_database:
            exists = "SELECT 1 FROM pg_database WHERE datname = %s"
            if not self.execute(exists, (DATABASE,), database="postgres"):
                self.create_database(DATABASE)
            self._created_database = True

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster): it rolls back open transactions,
        checkpoints and exits; SIGKILL if it is not gone after ``timeout`` seconds."""
        pid = self._pid
        if pid is None or not alive(pid):
            self._pid = None
            self._reap()
            return
        children = _children(pid)
        os.kill(pid, signal.SIGINT)
        if not _wait_gone([pid, *children], timeout):
            self.kill()
            return
        self._pid = None
        self._reap()

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the postmaster, as a crash would; the data survives (WAL replay on
        the next :meth:`start`).

        Its backends notice the postmaster's death and exit by themselves. The next
        start needs them gone: PostgreSQL refuses to start while an old process is
        still attached to the shared memory of the data directory. So they are waited
        for, and SIGKILLed after ``timeout`` seconds. The stale ``postmaster.pid`` stays:
        the next start sees that its pid is dead and replaces it.
        """
        pid, self._pid = self._pid, None
        if pid is not None and alive(pid):
            children = _children(pid)
            _signal(pid, signal.SIGKILL)
            if not _wait_gone([pid, *children], timeout):
                for child in children:
                    _signal(child, signal.SIGKILL)
                _wait_gone(children, 10)
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove a server directory made outside ``directory``
        (see :meth:`_make_home`); one under ``directory`` is left to pytest."""
        self.stop()
        if self._outside is not None:
            shutil.rmtree(self._outside, ignore_errors=True)
            self._outside = None

    # -- clients ---------------------------------------------------------------------

    def dsn(self, database: str = DATABASE, *, password: bool = True) -> str:
        """A ``postgresql://`` URI for ``database`` over TCP, as the superuser; with TLS,
        ``sslmode=verify-full`` against the CA. ``password=False`` leaves it out (for a
        test that passes it another way, or proves that it is needed)."""
        auth = f"{USER}:{quote(PASSWORD, safe='')}" if password else USER
        uri = f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"
        if self.tls is not None:
            uri += f"?sslmode=verify-full&sslrootcert={quote(str(self.tls[2]), safe='/')}"
        return uri

    def execute(
        self,
        sql: str | Composed,
        params: Sequence[Any] | None = None,
        *,
        database: str = DATABASE,
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser over the unix socket (autocommit); the
        rows it returns, if any."""
        import psycopg

        with psycopg.connect(
            host=str(self.data),
            port=self.port,
            user=USER,
            password=PASSWORD,
            dbname=database,
            autocommit=True,
        ) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str) -> str:
        """A new empty database (from template1); its DSN."""
        from psycopg import sql

        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        self.execute(create, database="postgres")
        return self.dsn(name)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------

    def _make_home(self) -> Path:
        """The server's directory (its data, its TLS files), owned by the server user.

        Under ``directory`` when the server user can reach it. As root it often cannot:
        pytest makes its temporary directories 0700 (``/tmp/pytest-of-root`` too).
        Opening those parents up (o+x) is not robust: the next pytest session on the
        machine, ours or another's, sets ``pytest-of-root`` back to 0700 and a later
        start or restart would fail. So then, or when the unix socket path would be too
        long, the directory is made with :func:`tempfile.mkdtemp` in /tmp (sticky,
        world-searchable), a symlink ``directory/postgres`` points at it, and
        :meth:`close` removes it.
        """
        home = self.directory / "postgres"
        socket_path = len(str(home / "data" / f".s.PGSQL.{self.port}"))
        if socket_path <= _SOCKET_PATH_MAX and self._can_reach(self.directory):
            home.mkdir(mode=0o700)
        else:
            self._outside = home_out = Path(tempfile.mkdtemp(prefix="gatewayd-pg-", dir="/tmp"))
            home.symlink_to(home_out)
            home = home_out
        if self._as is not None:
            os.chown(home, self._as.pw_uid, self._as.pw_gid)
        return home

    def _can_reach(self, path: Path) -> bool:
        if self._as is None:
            return True
        check = ["test", "-w", str(path), "-a", "-x", str(path)]
        return subprocess.run(self._as_server_user(check), check=False).returncode == 0

    def _as_server_user(self, args: list[str]) -> list[str]:
        if self._as is None:
            return args
        return ["runuser", "-u", self._as.pw_name, "--", *args]

    def _write_private(self, path: Path, data: bytes) -> None:
        """A file only the server user can read (a key, the initdb password)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if self._as is not None:
            os.chown(path, self._as.pw_uid, self._as.pw_gid)

    def _initdb(self) -> None:
        pwfile = self.home / "initdb.pw"
        self._write_private(pwfile, PASSWORD.encode())
        try:
            args = [
                str(self.bin / "initdb"),
                "-D", str(self.data),
                "-U", USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]  # fmt: skip
            done = subprocess.run(self._as_server_user(args), capture_output=True, check=False)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{output}")
        if self.tls is not None:
            cert, key, ca = self.tls
            shutil.copyfile(cert, self.home / "server.pem")
            # PostgreSQL refuses a key that others can read: 0600, the server user's.
            self._write_private(self.home / "server.key", key.read_bytes())
            shutil.copyfile(ca, self.home / "ca.pem")
        (self.data / "pg_hba.conf").write_text(self._hba())

    def _hba(self) -> str:
        # Only SCRAM-SHA-256, on the socket and on loopback TCP. With TLS, a TCP client
        # must use it: "hostnossl ... reject" says so in the refusal.
        if self.tls is None:
            tcp = "host      all  all  127.0.0.1/32  scram-sha-256\n"
        else:
            tcp = (
                "hostssl   all  all  127.0.0.1/32  scram-sha-256\n"
                "hostnossl all  all  0.0.0.0/0     reject\n"
            )
        head = "# TYPE   DATABASE USER ADDRESS    METHOD\n"
        return head + "local     all  all                scram-sha-256\n" + tcp

    def _settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.data),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "shared_buffers": "16MB",
            "max_connections": "100",
            "password_encryption": "scram-sha-256",
            "logging_collector": "off",
            "log_connections": "on",
        }
        if self.tls is not None:
            settings |= {
                "ssl": "on",
                "ssl_cert_file": str(self.home / "server.pem"),
                "ssl_key_file": str(self.home / "server.key"),
            }
        return settings

    def _accepting(self) -> bool:
        check = [
            str(self.bin / "pg_isready"),
            "-q",
            "-h", self.host,
            "-p", str(self.port),
            "-d", "postgres",
            "-U", USER,
            "-t", "1",
        ]  # fmt: skip
        return subprocess.run(check, check=False).returncode == 0

    def _postmaster_pid(self) -> int:
        """Line 1 of ``postmaster.pid``: as root, the Popen child is runuser."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __repr__(self) -> str:
        return f"<PostgresServer {self.host}:{self.port} data={self.data} pid={self._pid}>"


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresMissing(
            f"running as root, PostgreSQL must run as the {SERVER_USER!r} user, which "
            f"the Debian package {DEBIAN_PACKAGE!r} creates: apt-get install {DEBIAN_PACKAGE}"
        ) from None


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the postmaster's backends, its helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
