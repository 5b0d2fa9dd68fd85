"""One gateway as two processes on one store (``gateway.processes = 2``), and their owner.

One process uses one core at most (docs/performance.md). With ``processes = 2`` the
gateway runs as two, split where the store already splits it:

- **northbound**: the API server (downlink from the server), the registration, and the
  senders of the uplink and report queues to the server;
- **devices**: the transports (device intake) and the sender of the downlink queue.

Each process puts into queues the other sends from. A queue is sent from by one
process only, so no lane needs a lease; one transport instance per device keeps a
device's order at intake; and each process's lane index follows the other's inserts
(:mod:`gatewayd.store.follow`) instead of reading the file again. A commit that put
work for the other process nudges it through a pipe the owner made
(:class:`PipeNeighbour`): no polling, and an idle gateway stays idle.

The ``gatewayd run`` that starts them is their lifecycle owner (:class:`Owner`). It
speaks sd_notify for both: each part notifies the owner on a socket of its own, and
the owner tells systemd READY=1 once both are ready and WATCHDOG=1 while both ping. It
hands SIGTERM, SIGINT and SIGHUP on to both. When one part ends by itself, it stops
the other and exits with the first one's code, so systemd restarts the gateway whole;
a part whose owner dies (even by SIGKILL) stops too (:func:`watch_owner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

import structlog

from gatewayd.errors import ExitCode
from gatewayd.lifecycle import stop_budget
from gatewayd.store.model import Queue
from gatewayd.systemd import Notifier

log = structlog.get_logger(__name__)

# The environment variables naming a part's inherited descriptors: the pipe it reads
# end-of-file from when its owner is gone, and its nudge pipes ("<read>,<write>").
OWNER_FD: Final = "GATEWAYD_OWNER_FD"
NUDGE_FDS: Final = "GATEWAYD_NUDGE_FDS"
# How long after a part's graceful stop budget the owner waits before SIGKILL.
KILL_GRACE_SECONDS: Final = 5.0


class Part(StrEnum):
    """A side of a gateway split over two processes."""

    NORTHBOUND = "northbound"
    DEVICES = "devices"

    @property
    def works(self) -> frozenset[Queue]:
        """The queues this part sends from (and expires)."""
        if self is Part.NORTHBOUND:
            return frozenset({Queue.UPLINK, Queue.REPORT, Queue.SEGMENT, Queue.INTAKE})
        return frozenset({Queue.DOWNLINK})


class PipeNeighbour:
    """The other part, reached through two pipes: we write a byte into its pipe after a
    commit that gave it work, and read ours when it did the same for us."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read = read_fd
        self._write = write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)

    @classmethod
    def from_environment(cls) -> PipeNeighbour:
        """The pipes the owner handed this part."""
        read_fd, write_fd = (int(fd) for fd in os.environ[NUDGE_FDS].split(","))
        return cls(read_fd, write_fd)

    def nudge(self) -> None:
        # A full pipe holds nudges the other has not read yet: one more adds nothing.
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._write, b"!")

    def watch(self, nudged: Callable[[], None]) -> None:
        def readable() -> None:
            try:
                if not os.read(self._read, 4096):  # every nudge waiting: one catch-up
                    asyncio.get_running_loop().remove_reader(self._read)
                    return  # the other end is closed: the other part is gone
            except BlockingIOError:
                return
            nudged()

        asyncio.get_running_loop().add_reader(self._read, readable)


def watch_owner(on_gone: Callable[[], None]) -> None:
    """In a part: call ``on_gone`` (on the running loop) when the owner's end of the
    pipe closes, that is when the owner has exited, however it ended."""
    fd = os.environ.get(OWNER_FD)
    if fd is None:
        return
    loop = asyncio.get_running_loop()
    pipe = int(fd)

    def readable() -> None:
        with contextlib.suppress(OSError):
            if os.read(pipe, 1):
                return  # the owner never writes; be safe all the same
        loop.remove_reader(pipe)
        log.error("processes.owner_gone")
        on_gone()

    loop.add_reader(pipe, readable)


@dataclass(slots=True)
class _Child:
    part: Part
    process: asyncio.subprocess.Process
    socket: socket.socket
    ready: bool = False
    status: str = ""
    pinged: float | None = None  # the last WATCHDOG=1 (None: starting, not pinging yet)


class Owner:
    """Starts both parts, speaks for them to systemd, stops them together.

    ``command`` runs a part (``run --config ... --part ...`` is appended); by default
    this interpreter's ``gatewayd.cli``.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        drain_timeout: float,
        notifier: Notifier | None = None,
        command: Sequence[str] = (sys.executable, "-m", "gatewayd.cli"),
    ) -> None:
        self._config = config_path
        self._drain_timeout = drain_timeout
        self._notifier = notifier or Notifier()
        self._command = tuple(command)
        self._children: dict[Part, _Child] = {}
        self._stop = asyncio.Event()
        self._announced = False

    def request_stop(self) -> None:
        """SIGTERM or SIGINT: both parts drain and stop."""
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: both parts reload (and say READY=1 again when done)."""
        self._signal_all(signal.SIGHUP)

    @property
    def pids(self) -> dict[Part, int]:
        return {part: child.process.pid for part, child in self._children.items()}

    async def run(self) -> int:
        """Run both parts until a stop or until one ends; return the exit code."""
        owner_read, owner_write = os.pipe()  # the parts read EOF once we are gone
        to_north, to_devices = os.pipe(), os.pipe()  # each part's nudges (read, write)
        # What each part inherits: the owner pipe, its nudge pipe to read, the other's
        # to write.
        handed = {
            Part.NORTHBOUND: (owner_read, to_north[0], to_devices[1]),
            Part.DEVICES: (owner_read, to_devices[0], to_north[1]),
        }
        ours = [owner_read, *to_north, *to_devices]  # closed here once handed over
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix="gatewayd-") as folder:  # mode 0700
            try:
                for part in Part:
                    self._children[part] = await self._start(part, Path(folder), handed[part])
                for fd in ours:
                    os.close(fd)
                ours = []
                return await self._supervise()
            finally:
                for child in self._children.values():
                    loop.remove_reader(child.socket.fileno())
                    child.socket.close()
                for fd in ours:
                    os.close(fd)
                await self._reap()
                os.close(owner_write)

    async def _start(self, part: Part, folder: Path, fds: tuple[int, int, int]) -> _Child:
        path = folder / f"{part}.notify"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        sock.setblocking(False)
        owner_fd, nudge_read, nudge_write = fds
        env = dict(
            os.environ,
            NOTIFY_SOCKET=str(path),
            **{OWNER_FD: str(owner_fd), NUDGE_FDS: f"{nudge_read},{nudge_write}"},
        )
        env.pop("WATCHDOG_PID", None)  # ours; a part pings us whatever its pid
        interval = self._notifier.watchdog_interval
        if interval:
            env["WATCHDOG_USEC"] = str(int(interval * 1e6))
        else:
            env.pop("WATCHDOG_USEC", None)
        process = await asyncio.create_subprocess_exec(
            *self._command,
            "run",
            "--config",
            str(self._config),
            "--part",
            str(part),
            env=env,
            pass_fds=fds,
        )
        child = _Child(part, process, sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._receive, child)
        log.info("processes.started", part=str(part), pid=process.pid)
        return child

    async def _supervise(self) -> int:
        ended = {
            asyncio.create_task(child.process.wait(), name=f"owner:wait:{child.part}"): child
            for child in self._children.values()
        }
        stop = asyncio.create_task(self._stop.wait(), name="owner:stop")
        watchdog = None
        if self._notifier.watchdog_interval:
            interval = self._notifier.watchdog_interval
            watchdog = asyncio.create_task(self._watchdog(interval), name="owner:watchdog")
        try:
            done, _ = await asyncio.wait([*ended, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if watchdog is not None:
                watchdog.cancel()
        code = int(ExitCode.OK)
        first = next((ended[task] for task in ended if task in done), None)
        if first is not None and not self._stop.is_set():
            returned = first.process.returncode or 0
            # Ended with an error: its code (78 stays 78 for RestartPreventExitStatus).
            # Killed by a signal: a failure. Ended cleanly: it was told to stop (systemd
            # signals every process of the unit).
            code = returned if returned >= 0 else int(ExitCode.FAILURE)
            if code:
                log.error("processes.part_exited", part=str(first.part), exit_code=returned)
            else:
                log.info("processes.part_exited", part=str(first.part), exit_code=returned)
        self._notifier.stopping("stopping both processes")
        self._signal_all(signal.SIGTERM)
        budget = stop_budget(self._drain_timeout) + KILL_GRACE_SECONDS
        pending = [task for task in ended if not task.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=budget)
            for task in late:
                child = ended[task]
                log.error("processes.part_killed", part=str(child.part), after=budget)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
            await asyncio.gather(*late)
        if code == 0:
            # Told to stop: the gateway failed only if a part failed its stop.
            failed = [c for c in self._children.values() if (c.process.returncode or 0) != 0]
            if failed:
                code = int(ExitCode.FAILURE)
        log.info("processes.stopped", exit_code=code)
        return code

    def _signal_all(self, signum: int) -> None:
        for child in self._children.values():
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)

    async def _reap(self) -> None:
        # An owner leaving by an exception must not leave its parts behind.
        for child in self._children.values():
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()

    def _receive(self, child: _Child) -> None:
        while True:
            try:
                data = child.socket.recv(4096)
            except BlockingIOError:
                return
            lines = data.decode(errors="replace").splitlines()
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            self._notified(child, fields)

    def _notified(self, child: _Child, fields: dict[str, str]) -> None:
        if "STATUS" in fields:
            child.status = fields["STATUS"]
        if fields.get("WATCHDOG") == "1":
            child.pinged = time.monotonic()
        if fields.get("RELOADING") == "1":
            child.ready = False
            self._notifier.reloading()
        if fields.get("STOPPING") == "1" and not self._stop.is_set():
            self._notifier.stopping(f"{child.part}: {child.status}")
        if fields.get("READY") == "1":
            child.ready = True
            if all(c.ready for c in self._children.values()) and len(self._children) == len(Part):
                summary = "; ".join(f"{c.part}: {c.status}" for c in self._children.values())
                self._notifier.ready(summary)
                if not self._announced:
                    self._announced = True
                    log.info("processes.ready", pids={str(p): pid for p, pid in self.pids.items()})
            return
        if "STATUS" in fields:
            self._notifier.status(f"{child.part}: {child.status}")

    async def _watchdog(self, interval: float) -> None:
        # WATCHDOG=1 only while both parts ping: a stalled part gets the gateway restarted.
        # A part still starting does not ping yet; TimeoutStartSec= bounds its start.
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            late = [
                c
                for c in self._children.values()
                if c.pinged is not None and now - c.pinged > interval
            ]
            if not late:
                self._notifier.watchdog()
                continue
            for child in late:
                log.warning("processes.watchdog_late", part=str(child.part))
