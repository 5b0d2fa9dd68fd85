"""Issue 8 finding 10: the store is private whatever the umask.

The state directory holds message bodies, Service IDs and reply routes: created 0700;
the database and its WAL/SHM files 0600. A systemd unit sets a umask, a shell or a
container often does not.
"""

from __future__ import annotations

import os
from pathlib import Path

from gatewayd.store import Queue, SqliteStore, StoreSettings
from gatewayd.store.schema import private_dir


async def test_store_files_are_private_with_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        state = tmp_path / "state" / "deep"
        private_dir(state)
        store = await SqliteStore.open(StoreSettings(path=state / "gatewayd.db"))
        try:
            await store.put(Queue.UPLINK, msg_id="m-1", dedup_key="m-1", lane="d", body={"x": 1})
            files = sorted(p.name for p in state.iterdir())
            modes = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
        finally:
            await store.close()
    finally:
        os.umask(old)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert state.stat().st_mode & 0o777 == 0o700
    assert files == ["gatewayd.db", "gatewayd.db-shm", "gatewayd.db-wal"]
    assert modes == dict.fromkeys(files, 0o600)


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    # A shared parent (/var/lib, /tmp) is never chmod-ed: only what we create.
    tmp_path.chmod(0o755)
    private_dir(tmp_path / "state")
    assert tmp_path.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
