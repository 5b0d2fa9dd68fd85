"""Drives tests/smsc/smsc.js: an SMSC built on the npm ``smpp`` package, in a subprocess.

Commands go to its stdin and events come back on its stdout, one JSON object a line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "smsc"

Event = dict[str, Any]


class Smsc:
    """One SMSC process; :meth:`restart` brings it back on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.events: list[Event] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._seq = itertools.count(1)

    async def start(self, port: int = 0) -> None:
        node = shutil.which("node")
        if node is None or not (HERE / "node_modules" / "smpp").is_dir():
            raise RuntimeError(
                "the test SMSC needs node and tests/smsc/node_modules: run ./dev setup"
            )
        self._proc = await asyncio.create_subprocess_exec(
            node,
            str(HERE / "smsc.js"),
            str(port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=HERE,
        )
        assert self._proc.stdout is not None
        first = await asyncio.wait_for(self._proc.stdout.readline(), 10)
        word, _, number = first.decode().strip().partition(" ")
        if word != "listening":
            raise RuntimeError(f"the test SMSC said {first!r}")
        self.port = int(number)
        self._reader = asyncio.create_task(self._read(self._proc), name="smsc:reader")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            event = json.loads(line)
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    async def stop(self) -> None:
        """Stop the process by its pid (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
        if self._reader is not None:
            await self._reader

    async def restart(self) -> None:
        port = self.port
        await self.stop()
        await self.start(port)

    async def command(self, op: str, **fields: Any) -> None:
        """Send a command and wait until the SMSC has carried it out."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        seq = next(self._seq)
        self._proc.stdin.write(json.dumps({"op": op, "seq": seq, **fields}).encode() + b"\n")
        await self._proc.stdin.drain()
        await self.wait_for(lambda e: e["event"] == "done" and e.get("seq") == seq)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["event"] == kind]

    async def wait_for(
        self, match: Callable[[Event], bool], *, count: int = 1, timeout: float = 10.0
    ) -> list[Event]:
        """The first ``count`` events matching; waits for them to arrive."""

        def found() -> list[Event]:
            return [e for e in self.events if match(e)]

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(found()) >= count)
        return found()[:count]

    async def next(self, kind: str, *, after: int = 0, timeout: float = 10.0) -> Event:
        """The first event of ``kind`` beyond the first ``after`` of that kind."""
        events = await self.wait_for(lambda e: e["event"] == kind, count=after + 1, timeout=timeout)
        return events[after]
