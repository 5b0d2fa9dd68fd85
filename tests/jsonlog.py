"""Reading what a `gatewayd run` process logged: one JSON object per line, to a file."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any


def entries(text: str) -> list[dict[str, Any]]:
    """Every JSON log line in ``text``; a line cut short (by SIGKILL, say) is skipped."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(entry)
    return out


def events(log_path: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in entries(log_path.read_text()) if e.get("event") == name]


def tail(log_path: Path) -> str:
    return log_path.read_text()[-3000:]


async def wait_for_event(log_path: Path, name: str, count: int = 1, timeout: float = 30) -> None:
    # The log is a file another process writes: polling it is the only way to watch.
    async with asyncio.timeout(timeout):
        while True:
            if len(events(log_path, name)) >= count:
                return
            await asyncio.sleep(0.1)
