"""A sampling profile of a running process with py-spy, summarised by self time."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid`` and its children (all threads, native frames off) for ``seconds``
    into ``out``: a ``gateway.processes = 2`` gateway's parts are the owner's children."""
    exe = py_spy()
    assert exe is not None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--nonblocking",
            "--threads",
            "--subprocesses",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def where(file: str) -> str:
    """A frame's package as py-spy names files (relative to sys.path): ``paho``,
    ``aiohttp``, ``asyncio``, ``ssl``; gatewayd's own split one level further."""
    parts = file.split("/")
    if parts[0] == "gatewayd" and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    leaf: Counter[str] = Counter()
    package_self: Counter[str] = Counter()
    package_incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = stack.split(";")
        command = ""
        while frames and frames[0].startswith("process "):  # --subprocesses: parent first
            command = frames.pop(0)
        if command:
            part = command.split("--part ", 1)[1].split()[0] if "--part " in command else "main"
            processes[part.rstrip('"')] += n
        if frames and frames[0].startswith("thread ("):
            threads[frames[0].split(": ", 1)[-1]] += n
        parsed = [m for m in (_FRAME.match(f) for f in frames) if m]
        if not parsed:
            continue
        total += n
        last = parsed[-1]
        leaf[f"{last['func']} ({where(last['file'])})"] += n
        package_self[where(last["file"])] += n
        for pkg in {where(m["file"]) for m in parsed}:
            package_incl[pkg] += n

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "self_by_function_pct": share(leaf),
        "self_by_package_pct": share(package_self),
        "inclusive_by_package_pct": share(package_incl),
        "by_thread_pct": share(threads),
        "by_process_pct": share(processes),
    }
