"""Expiry against sends in flight and full disks (issue 9, known gaps of the durability
work), on the real store: SQLite on disk, the writer thread, a real size cap."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gatewayd.errors import BacklogFullError, StoreError
from gatewayd.store import Item, PutRequest, Queue, SqliteStore, Store, StoreSettings
from gatewayd.store import store as store_module


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await SqliteStore.open(StoreSettings(path=tmp_path / "gw.db")) as opened:
        yield opened


async def put(store: Store, key: str, *, expires_at: float | None, size: int = 10) -> None:
    await store.put(
        Queue.UPLINK,
        msg_id=key,
        dedup_key=key,
        lane=f"lane-{key}",
        body={"payload": "x" * size},
        expires_at=expires_at,
    )


def report_for(item: Item) -> tuple[Queue, PutRequest]:
    request = PutRequest(
        msg_id=item.msg_id,
        dedup_key=f"report:{item.msg_id}",
        lane=item.lane,
        # Large enough to need new pages: on a full disk it cannot be stored.
        body={"report": "EXPIRED", "for": item.msg_id, "pad": "r" * 8000},
    )
    return Queue.DOWNLINK, request


async def test_a_message_being_sent_is_not_expired_under_it(store: Store) -> None:
    """It used to be: delivered by the sender *and* moved to the DLQ by the sweep, with
    an EXPIRED report sent anyway."""
    soon = time.time() + 0.2
    await put(store, "in-flight", expires_at=soon)
    await put(store, "idle", expires_at=soon)
    (sending,) = await store.due(Queue.UPLINK, limit=1)  # a worker took it
    assert sending.msg_id == "in-flight"
    later = soon + 1
    expired = await store.expire(now=later)
    assert [i.msg_id for i in expired] == ["idle"]
    await store.done(sending.id)  # the send finished: delivered, and only that
    assert (await store.get(sending.id)).state == "done"  # type: ignore[union-attr]
    assert await store.expire(now=later) == []


async def test_an_unsettled_send_may_expire_again(store: Store) -> None:
    """A send cancelled at stop releases its item: the next sweep may expire it."""
    await put(store, "m", expires_at=time.time() + 0.1)
    (item,) = await store.due(Queue.UPLINK, limit=1)
    store.release(item.id)
    (expired,) = await store.expire(now=time.time() + 1)
    assert expired.id == item.id


async def test_expiry_report_is_stored_with_the_expiry_on_a_full_disk(store: Store) -> None:
    """The report used to wait in memory while the disk was full (a crash lost it). Now
    the expiry and its report commit together: a full disk delays both."""
    await put(store, "old", expires_at=time.time() + 0.1)
    stats = await store.stats()
    await store.limit_size(stats["db_bytes"] + 16 * 1024)
    filled = 0
    while filled < 10_000:  # fill the disk
        try:
            await put(store, f"fill-{filled}", expires_at=None, size=2000)
        except BacklogFullError:
            break
        filled += 1
    assert filled < 10_000
    later = time.time() + 1
    with pytest.raises(StoreError):
        await store.expire(now=later, report=report_for)
    # Nothing half-done: the message is still pending and there is no report.
    (old,) = [
        i
        for i in await store.list_items(queue=Queue.UPLINK, state=None, limit=5)
        if i.msg_id == "old"
    ]
    assert old.state == "pending"
    assert await store.list_items(queue=Queue.DOWNLINK, state=None, limit=5) == []

    await store.limit_size(None)  # space returns
    (expired,) = await store.expire(now=later, report=report_for)
    assert expired.msg_id == "old"
    (report,) = await store.list_items(queue=Queue.DOWNLINK, state="pending", limit=5)
    assert (report.body["report"], report.body["for"]) == ("EXPIRED", "old")


async def test_rejected_intake_is_kept_once_and_never_replayed(store: Store) -> None:
    """Input refused for good stays visible in the DLQ (queue ``intake``), is recorded
    once when a broker redelivers it, and cannot be replayed into a sender."""
    outcomes = [
        await store.put_rejected(
            msg_id="bad-1",
            dedup_key="rejected:mqtt:dev:bad-1",
            lane="mqtt:dev",
            reason="invalid_message: payload is not valid Unicode text",
            body={"content": "\\ud800"},
        )
        for _ in range(2)
    ]
    assert outcomes == ["stored", "duplicate"]
    (record,) = await store.list_items(queue=Queue.INTAKE, state="dead", limit=5)
    assert str(record.last_error).startswith("invalid_message")
    assert not await store.replay(record.id)
    assert (await store.stats())["backlog"]["messages"] == 0  # no work to do


async def test_rejected_intake_records_are_capped(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device sending garbage cannot fill the disk through the DLQ."""
    monkeypatch.setattr(store_module, "MAX_REJECTED", 3)
    outcomes = [
        await store.put_rejected(
            msg_id=f"bad-{i}", dedup_key=f"k{i}", lane="l", reason="not_json", body={}
        )
        for i in range(5)
    ]
    assert outcomes == ["stored"] * 3 + ["dlq_full"] * 2
