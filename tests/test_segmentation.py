"""MSGin5G segmentation below the wire: cutting payloads, reassembly, and the durable parts.

The end-to-end cases (through a gateway and the reference server, both roles) are in
``test_segmentation_e2e.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
from gatewayd_sim import harness, schemas
from gatewayd_sim.harness import Pki

from gatewayd import config, envelope, segments
from gatewayd.errors import BacklogFullError, ConfigError, InvalidBodyError, InvalidMessageError
from gatewayd.msgin5g.model import (
    Address,
    GatewayMessageDelivery,
    MessageSegmentParameters,
    UEMessageDelivery,
)
from gatewayd.store import PartResult, Queue, SqliteStore, State, Store, StoreSettings

MSGS = "TS29538_MSGS_MSGDelivery.yaml"
SERVICE_ID = "ue-1@iot.example"


def _uplink(payload: str, *, msg_id: str = "m-1", report: bool = True) -> UEMessageDelivery:
    return UEMessageDelivery(
        ori_addr=Address.ue(SERVICE_ID),
        dest_addr=Address("AS", "as@example"),
        msg_id=msg_id,
        sto_and_fw_ind=True,
        deliv_st_req_ind=report or None,
        payload=payload,
    )


def _downlink(payload: str, *, msg_id: str = "d-1", report: bool = True) -> GatewayMessageDelivery:
    return GatewayMessageDelivery(
        ori_addr=Address("AS", "as@example"),
        dest_addr=Address.ue(SERVICE_ID),
        msg_id=msg_id,
        deliv_st_req_ind=report or None,
        payload=payload,
    )


# --- cutting -----------------------------------------------------------------------------


def test_split_payload_never_cuts_a_character_and_keeps_every_byte() -> None:
    payload = "aé€😀" * 50  # 1-, 2-, 3- and 4-byte UTF-8 characters
    for size in (4, 5, 7, 64):
        pieces = segments.split_payload(payload, size)
        assert "".join(pieces) == payload
        assert all(0 < len(p.encode()) <= size for p in pieces)


def test_a_character_wider_than_the_segment_size_goes_whole_and_alone() -> None:
    assert segments.split_payload("a😀b", 2) == ["a", "😀", "b"]


def test_a_payload_at_the_limit_is_one_message_one_byte_over_is_two_segments() -> None:
    at_limit = _uplink("x" * 2048)
    assert segments.split(at_limit, size=2048, max_segments=4) == [at_limit]
    over = segments.split(_uplink("x" * 2049), size=2048, max_segments=4)
    assert [len((s.payload or "").encode()) for s in over] == [2048, 1]


def test_segments_carry_spec_fields_and_validate_against_the_3gpp_schema() -> None:
    parts = segments.split(_uplink("abcdefghij", msg_id="m-7"), size=4, max_segments=8)
    assert [p.payload for p in parts] == ["abcd", "efgh", "ij"]
    assert [p.msg_id for p in parts] == ["m-7.1", "m-7.2", "m-7.3"]
    assert all(p.seg_ind for p in parts)
    # TS 23.554 8.5.4 step 2: count and report request on the first, the flag on the last.
    assert [p.seg_params for p in parts] == [
        MessageSegmentParameters(seg_id="m-7", total_seg_count=3, seg_numb=1),
        MessageSegmentParameters(seg_id="m-7", seg_numb=2),
        MessageSegmentParameters(seg_id="m-7", seg_numb=3, last_seg_flag=True),
    ]
    assert [p.deliv_st_req_ind for p in parts] == [True, None, None]
    for part in parts:
        schemas.validate(MSGS, "UEMessageDelivery", part.to_json())
        assert segments.whole_msg_id(part) == "m-7"


def test_more_segments_than_allowed_is_refused_naming_the_keys() -> None:
    with pytest.raises(InvalidMessageError, match=r"relay\.max_segments \(2\)"):
        segments.split(_uplink("x" * 9), size=4, max_segments=2)


def test_uplink_requests_keep_the_plain_dedup_key_and_number_the_segments() -> None:
    (one,) = segments.uplink_requests(
        _uplink("short"), dedup_key="up:k", lane="L", expires_at=None, size=8, max_segments=4
    )
    assert one.dedup_key == "up:k"
    many = segments.uplink_requests(
        _uplink("x" * 20), dedup_key="up:k", lane="L", expires_at=5.0, size=8, max_segments=4
    )
    assert [r.dedup_key for r in many] == ["up:k#1", "up:k#2", "up:k#3"]
    assert {r.lane for r in many} == {"L"}
    assert {r.expires_at for r in many} == {5.0}


# --- reassembly --------------------------------------------------------------------------


def test_assemble_out_of_order_needs_every_segment() -> None:
    parts = segments.split(_downlink("0123456789"), size=3, max_segments=8)
    assert len(parts) == 4
    shuffled = [parts[3], parts[1], parts[0]]
    assert segments.assemble(shuffled) is None
    whole = segments.assemble([*shuffled, parts[2]])
    assert whole is not None
    assert (whole.msg_id, whole.payload, whole.deliv_st_req_ind) == ("d-1", "0123456789", True)
    assert (whole.seg_ind, whole.seg_params) == (None, None)


def test_the_count_may_come_from_the_last_segment_flag_alone() -> None:
    first, second = segments.split(_downlink("abcdef", report=False), size=3, max_segments=8)
    without_count = GatewayMessageDelivery.from_json(
        {**first.to_json(), "segParams": {"segId": "d-1", "segNumb": 1}}
    )
    whole = segments.assemble([second, without_count])
    assert whole is not None
    assert whole.payload == "abcdef"


def test_assemble_wants_every_number_not_merely_as_many_parts() -> None:
    first, second = segments.split(_downlink("abcdef"), size=3, max_segments=8)
    stray = GatewayMessageDelivery.from_json(
        {**second.to_json(), "segParams": {"segId": "d-1", "segNumb": -1}}
    )
    assert segments.assemble([first, stray]) is None  # was a KeyError: a 500 in the sim
    assert segments.assemble([first, stray, second]) is not None


def test_a_segment_that_contradicts_the_count_is_refused() -> None:
    first, second = segments.split(_downlink("abcdef"), size=3, max_segments=8)
    liar = GatewayMessageDelivery.from_json(
        {**second.to_json(), "segParams": {"segId": "d-1", "segNumb": 2, "totalSegCount": 5}}
    )
    with pytest.raises(InvalidBodyError) as caught:
        segments.assemble([first, liar])
    assert caught.value.pointer == "/segParams/totalSegCount"


@pytest.mark.parametrize(
    ("change", "pointer"),
    [
        ({"segInd": False}, "/segInd"),
        ({"segParams": {"segNumb": 1}}, "/segParams/segId"),
        ({"segParams": {"segId": "s"}}, "/segParams/segNumb"),
        ({"segParams": {"segId": "s", "segNumb": 0}}, "/segParams/segNumb"),
        ({"segParams": {"segId": "s", "segNumb": 9}}, "/segParams/segNumb"),
        ({"segParams": {"segId": "s", "segNumb": 3, "totalSegCount": 2}}, "/segParams/segNumb"),
        (
            {"segParams": {"segId": "s", "segNumb": 1, "totalSegCount": 0}},
            "/segParams/totalSegCount",
        ),
    ],
)
def test_check_names_the_offending_field(change: dict[str, object], pointer: str) -> None:
    body = {**_downlink("p").to_json(), "segInd": True, **change}
    with pytest.raises(InvalidBodyError) as caught:
        segments.check(GatewayMessageDelivery.from_json(body), max_segments=8)
    assert caught.value.pointer == pointer


# --- durable parts -----------------------------------------------------------------------


async def _put(store: Store, part: GatewayMessageDelivery, timeout: float = 60.0) -> PartResult:
    return await segments.put_downlink_segment(
        store, part, service_id=SERVICE_ID, pipeline=1, timeout=timeout, max_segments=8
    )


async def test_segments_survive_a_restart_and_complete_out_of_order(tmp_path: Path) -> None:
    settings = StoreSettings(path=tmp_path / "s.db")
    parts = segments.split(_downlink("abcdefghi"), size=3, max_segments=8)
    async with await SqliteStore.open(settings) as store:
        first = await _put(store, parts[2])
        assert (first.duplicate, first.whole) == (False, None)
        assert (await _put(store, parts[2])).duplicate  # a resend of the same segment
        assert (await _put(store, parts[0])).whole is None
        assert await store.due(Queue.DOWNLINK, limit=10) == []
    # A restart between segments: the two accepted ones are still there.
    async with await SqliteStore.open(settings) as store:
        pending = await store.list_items(queue=Queue.SEGMENT, state="pending", limit=10)
        assert len(pending) == 2
        done = await _put(store, parts[1])
        assert done.whole is not None
        assert not done.whole.duplicate
        (item,) = await store.due(Queue.DOWNLINK, limit=10)
        assert item.msg_id == "d-1"
        assert item.body["wire"]["payload"] == "abcdefghi"
        assert "segParams" not in item.body["wire"]
        schemas.validate("TS29538_MSGG_N3GDelivery.yaml", "N3gMessageDelivery", item.body["wire"])
        # The parts are done (dedup tombstones), so they count no more against the backlog.
        assert await store.list_items(queue=Queue.SEGMENT, state="pending", limit=10) == []
        stats = await store.stats()
        assert stats["backlog"]["messages"] == 1
        # A late duplicate of any segment changes nothing and queues nothing again.
        assert (await _put(store, parts[0])).duplicate
        assert len(await store.due(Queue.DOWNLINK, limit=10)) == 1


def test_segment_bodies_are_built_by_the_module_that_owns_the_body_format() -> None:
    """Structural: the queue body format has one owner, gatewayd.envelope. segments kept
    its own copy of the "message" kind, free to drift from what the dispatcher reads."""
    assert segments.downlink_body is envelope.downlink_body
    assert segments.KIND_MESSAGE is envelope.KIND_MESSAGE
    assert [name for name in vars(segments) if "KIND" in name] == ["KIND_MESSAGE"]


async def test_a_set_expires_together_from_its_first_segment(tmp_path: Path) -> None:
    parts = segments.split(_downlink("abcdefghi"), size=3, max_segments=8)
    async with await SqliteStore.open(StoreSettings(path=tmp_path / "s.db")) as store:
        before = time.time()
        await _put(store, parts[0], timeout=30)
        await _put(store, parts[2], timeout=3600)  # joins the set: keeps its deadline
        expired = await store.expire(now=before + 31)
        assert sorted(i.msg_id for i in expired) == ["d-1.1", "d-1.3"]
        assert {i.queue for i in expired} == {Queue.SEGMENT}
        assert {i.state for i in expired} == {State.DEAD}


async def test_an_inconsistent_segment_writes_nothing(tmp_path: Path) -> None:
    first, second = segments.split(_downlink("abcdef"), size=3, max_segments=8)
    liar = GatewayMessageDelivery.from_json(
        {**second.to_json(), "segParams": {"segId": "d-1", "segNumb": 2, "totalSegCount": 5}}
    )
    async with await SqliteStore.open(StoreSettings(path=tmp_path / "s.db")) as store:
        await _put(store, first)
        with pytest.raises(InvalidBodyError):
            await _put(store, liar)
        pending = await store.list_items(queue=Queue.SEGMENT, state="pending", limit=10)
        assert [i.msg_id for i in pending] == ["d-1.1"]
        # The honest segment 2 still completes the message.
        assert (await _put(store, second)).whole is not None


async def test_a_segment_number_seen_before_is_a_duplicate_whatever_its_msg_id(
    tmp_path: Path,
) -> None:
    first, second = segments.split(_downlink("abcdef"), size=3, max_segments=8)
    resent = dataclasses.replace(first, msg_id="another-id-for-segment-1")
    async with await SqliteStore.open(StoreSettings(path=tmp_path / "s.db")) as store:
        assert not (await _put(store, first)).duplicate
        assert (await _put(store, resent)).duplicate
        done = await _put(store, second)
        assert done.whole is not None
        (item,) = await store.due(Queue.DOWNLINK, limit=10)
        assert item.body["wire"]["payload"] == "abcdef"


async def test_segments_arriving_together_complete_the_message_once(tmp_path: Path) -> None:
    parts = segments.split(_downlink("x" * 40), size=6, max_segments=8)
    async with await SqliteStore.open(StoreSettings(path=tmp_path / "s.db")) as store:
        # All at once, twice over: they share group-commit transactions on the writer.
        results = await asyncio.gather(*(_put(store, p) for p in [*parts, *parts]))
        assert sum(r.whole is not None for r in results) == 1
        assert sum(r.duplicate for r in results) == len(parts)
        (item,) = await store.due(Queue.DOWNLINK, limit=10)
        assert item.body["wire"]["payload"] == "x" * 40


async def test_a_full_backlog_refuses_a_segment_and_stores_nothing(tmp_path: Path) -> None:
    first, second, _ = segments.split(_downlink("abcdefghi"), size=3, max_segments=8)
    settings = StoreSettings(path=tmp_path / "s.db", max_messages=1)
    async with await SqliteStore.open(settings) as store:
        await _put(store, first)
        with pytest.raises(BacklogFullError):
            await _put(store, second)
        pending = await store.list_items(queue=Queue.SEGMENT, state="pending", limit=10)
        assert [i.msg_id for i in pending] == ["d-1.1"]


# --- configuration -----------------------------------------------------------------------


def _load(tmp_path: Path, pki: Pki, relay: str) -> config.Settings:
    text = harness.gateway_toml(
        pki,
        api_root="https://127.0.0.1:9",
        state_dir=tmp_path / "s",
        transports=harness.http_transport_bearer(),
        extra=f"[relay]\n{relay}\n",
    )
    return harness.write_config(tmp_path / "gw.toml", text)


def test_segmentation_keys_have_safe_defaults(tmp_path: Path, loopback_pki: Pki) -> None:
    relay = _load(tmp_path, loopback_pki, "").relay
    assert (relay.max_payload, relay.max_segments, relay.reassembly_timeout) == (2048, 32, 120.0)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("max_segments = 0", "relay.max_segments"),
        ("reassembly_timeout = 0", "relay.reassembly_timeout"),
    ],
)
def test_a_bad_segmentation_key_is_named(
    tmp_path: Path, loopback_pki: Pki, line: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{key}:"):
        _load(tmp_path, loopback_pki, line)
