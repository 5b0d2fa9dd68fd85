"""Processes the benchmark owns: started with a fixed argv, measured from /proc, stopped by pid.

CPU time is utime + stime of the whole process (all its threads) from
``/proc/<pid>/stat``, in clock ticks; peak RSS is ``VmHWM`` from ``/proc/<pid>/status``.
A process that runs children (a ``gateway.processes = 2`` gateway: the owner and its
two parts) is measured with them: CPU and memory are summed over its process tree.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_pair() -> int:
    """A port free together with the next one (a two-process gateway's admin listeners)."""
    while True:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``; 0.0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces: fields count from after its closing paren.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants alive now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak) and ``VmRSS`` (now) in kB."""
    out = {"VmHWM": 0, "VmRSS": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class Proc:
    """One child process with its output in a file (or a line callback for stdout)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        on_line: Callable[[float, str], None] | None = None,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("ab")
        stdout: int | object = subprocess.PIPE if on_line else self._log_file
        self.popen = subprocess.Popen(
            list(argv),
            # The SMSC exits when its stdin closes: it gets a pipe held open until stop.
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=stdout,  # type: ignore[arg-type]
            stderr=self._log_file,
            env=dict(env) if env is not None else None,
        )
        self.pid = self.popen.pid
        self.started = time.monotonic()
        self._reader: threading.Thread | None = None
        if on_line is not None:
            self._reader = threading.Thread(
                target=self._read, args=(on_line,), name=f"read-{name}", daemon=True
            )
            self._reader.start()

    def _read(self, on_line: Callable[[float, str], None]) -> None:
        # Each line is stamped the moment it is read: the SMSC's events carry no time.
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            on_line(time.time(), raw.decode("utf-8", "replace"))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in tree(self.pid))

    def memory(self) -> dict[str, int]:
        total = {"VmHWM": 0, "VmRSS": 0}
        for pid in tree(self.pid):
            for key, kb in memory_kb(pid).items():
                total[key] += kb
        return total

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM by pid, SIGKILL after ``timeout``; the exit code."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        if self._reader is not None:
            self._reader.join(5)
        self._log_file.close()
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Meter:
    """CPU seconds of several processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, procs: Mapping[str, Proc]) -> None:
        self.procs = dict(procs)
        self._cpu0: dict[str, float] = {}
        self.load_start: list[float] = []
        self.load_end: list[float] = []
        self.seconds = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        self.load_start = loadavg()
        self._cpu0 = {name: p.cpu() for name, p in self.procs.items()}
        self._t0 = time.monotonic()

    def stop(self, messages: int) -> dict[str, object]:
        self.seconds = time.monotonic() - self._t0
        self.load_end = loadavg()
        per_proc: dict[str, dict[str, float]] = {}
        for name, p in self.procs.items():
            used = p.cpu() - self._cpu0[name]
            mem = p.memory()
            per_proc[name] = {
                "cpu_s": round(used, 3),
                "cpu_us_per_msg": round(1e6 * used / messages, 1) if messages else 0.0,
                "cpu_util": round(used / self.seconds, 3) if self.seconds else 0.0,
                "peak_rss_mb": round(mem["VmHWM"] / 1024, 1),
                "rss_mb": round(mem["VmRSS"] / 1024, 1),
            }
        return {
            "processes": per_proc,
            "window_s": round(self.seconds, 3),
            "loadavg_start": self.load_start,
            "loadavg_end": self.load_end,
        }
