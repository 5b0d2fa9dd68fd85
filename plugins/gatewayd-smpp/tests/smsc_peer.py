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
from pathlib import Path
from typing import Any

from peer_events import EventLog

HERE = Path(__file__).parent / "smsc"


class Smsc(EventLog):
    """One SMSC process; :meth:`restart` brings it back on the same port."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
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
            await self.add(json.loads(line))

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
