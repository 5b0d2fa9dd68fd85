"""MSGin5G segmentation and reassembly (TS 23.554 clause 8.5, TS 29.538 ``segParams``).

The gateway segments and reassembles when one side is a non-MSGin5G device (8.5.1): an
uplink payload longer than ``relay.max_payload`` bytes leaves as several segments, and
segments the server sends down are stored until their message is whole, then delivered
as one message. TS 29.538 gives the fields (``segInd``; ``segParams``: ``segId``,
``totalSegCount``, ``segNumb``, ``lastSegFlag``) but no descriptions; their use here
follows TS 23.554 8.5.4 step 2 and is ours where the texts are silent (docs/segmentation.md):

- every segment is a message of its own with its own ``msgId`` (``<msgId>.<n>``),
  ``segInd: true`` and the ``segId`` of its set: the ``msgId`` of the whole message,
  which is also the ``msgId`` a delivery report about the whole carries;
- ``segNumb`` counts from 1; ``totalSegCount`` and ``delivStReqInd`` ride on the first
  segment, ``lastSegFlag: true`` on the last (8.5.4 step 2);
- a receiver knows the count from ``totalSegCount`` or from the segment flagged last,
  whichever comes first, and takes ``delivStReqInd`` from any segment.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from gatewayd.envelope import KIND_MESSAGE, device_lane, downlink_body
from gatewayd.errors import InvalidBodyError, InvalidMessageError
from gatewayd.msgin5g.model import (
    GatewayMessageDelivery,
    MessageSegmentParameters,
    UEMessageDelivery,
)
from gatewayd.store import PartResult, PutRequest, Queue, Store

M = TypeVar("M", UEMessageDelivery, GatewayMessageDelivery)


def is_segment(message: UEMessageDelivery | GatewayMessageDelivery) -> bool:
    return bool(message.seg_ind) or message.seg_params is not None


def whole_msg_id(message: UEMessageDelivery | GatewayMessageDelivery) -> str:
    """The ``msgId`` of the whole message a segment belongs to (its own when unsegmented)."""
    if message.seg_params is not None and message.seg_params.seg_id:
        return message.seg_params.seg_id
    return message.msg_id


def split_payload(payload: str, size: int) -> list[str]:
    """``payload`` cut into pieces of at most ``size`` UTF-8 bytes, never inside a character.

    Cut on the encoded bytes (a walk per character cost ~1 ms per 8 KiB), moving each cut
    back to the start of a character: UTF-8 continuation bytes are ``0b10xxxxxx``.
    """
    data = payload.encode("utf-8", "surrogatepass")
    pieces: list[str] = []
    start = 0
    while len(data) - start > size:
        end = start + size
        while end > start and data[end] & 0xC0 == 0x80:
            end -= 1
        if end == start:  # one character wider than size: it goes alone, whole
            end = start + 1
            while end < len(data) and data[end] & 0xC0 == 0x80:
                end += 1
        pieces.append(data[start:end].decode("utf-8", "surrogatepass"))
        start = end
    pieces.append(data[start:].decode("utf-8", "surrogatepass"))
    return pieces


def split(message: M, *, size: int, max_segments: int) -> list[M]:
    """The message itself when its payload fits ``size`` bytes, else its segments.

    Raises :class:`InvalidMessageError` (naming the keys) when it would take more than
    ``max_segments`` segments.
    """
    payload = message.payload
    if payload is None or len(payload.encode("utf-8", "surrogatepass")) <= size:
        return [message]
    pieces = split_payload(payload, size)
    if len(pieces) > max_segments:
        raise InvalidMessageError(
            f"payload is {len(payload.encode('utf-8', 'surrogatepass'))} bytes: "
            f"{len(pieces)} segments of relay.max_payload ({size}) bytes, "
            f"more than relay.max_segments ({max_segments})"
        )
    total = len(pieces)
    return [
        dataclasses.replace(
            message,
            msg_id=f"{message.msg_id}.{n}",
            payload=piece,
            deliv_st_req_ind=message.deliv_st_req_ind if n == 1 else None,
            seg_ind=True,
            seg_params=MessageSegmentParameters(
                seg_id=message.msg_id,
                total_seg_count=total if n == 1 else None,
                seg_numb=n,
                last_seg_flag=True if n == total else None,
            ),
        )
        for n, piece in enumerate(pieces, start=1)
    ]


def uplink_requests(
    message: UEMessageDelivery,
    *,
    dedup_key: str,
    lane: str,
    expires_at: float | None,
    size: int,
    max_segments: int,
) -> list[PutRequest]:
    """The store puts for one uplink message: one, or one per segment (in order).

    An unsegmented message keeps ``dedup_key``; segment ``n`` gets ``<dedup_key>#<n>``,
    so a device's resend of the whole message is recognised segment by segment.
    """
    parts = split(message, size=size, max_segments=max_segments)
    if len(parts) == 1:
        keys = [dedup_key]
    else:
        keys = [f"{dedup_key}#{n}" for n in range(1, len(parts) + 1)]
    return [
        PutRequest(
            msg_id=part.msg_id,
            dedup_key=key,
            lane=lane,
            body=part.to_json(),
            expires_at=expires_at,
        )
        for part, key in zip(parts, keys, strict=True)
    ]


# --- reassembly ----------------------------------------------------------------------


def check(message: M, *, max_segments: int) -> tuple[str, int]:
    """The segment's ``(segId, segNumb)``, if it can be one; else :class:`InvalidBodyError`."""
    params = message.seg_params
    if not message.seg_ind:
        raise InvalidBodyError("/segInd", "must be true when segParams is present")
    if params is None:
        raise InvalidBodyError("/segParams", "is required when segInd is true")
    if not params.seg_id:
        raise InvalidBodyError("/segParams/segId", "is required in a segment")
    if params.seg_numb is None:
        raise InvalidBodyError("/segParams/segNumb", "is required in a segment")
    if params.seg_numb < 1:
        raise InvalidBodyError("/segParams/segNumb", "must be at least 1")
    if params.seg_numb > max_segments:
        raise InvalidBodyError(
            "/segParams/segNumb", f"exceeds the gateway's limit of {max_segments} segments"
        )
    if params.total_seg_count is not None:
        if not 1 <= params.total_seg_count <= max_segments:
            raise InvalidBodyError(
                "/segParams/totalSegCount", f"must be between 1 and {max_segments}"
            )
        if params.seg_numb > params.total_seg_count:
            raise InvalidBodyError("/segParams/segNumb", "exceeds totalSegCount")
    if message.payload is None:
        raise InvalidBodyError("/payload", "is required in a segment")
    return params.seg_id, params.seg_numb


def assemble(parts: Sequence[M]) -> M | None:
    """The whole message once every segment of the set is here, else ``None``.

    ``parts`` are distinct segments of one set (duplicates are filtered before). Raises
    :class:`InvalidBodyError` when the newest part (the last) contradicts the others.
    """
    newest = parts[-1]
    known: dict[int, M] = {}
    total: int | None = None
    for part in parts:
        params = part.seg_params
        if params is None or params.seg_numb is None:
            raise InvalidBodyError("/segParams/segNumb", "is required in a segment")
        known[params.seg_numb] = part
        for count, pointer in (
            (params.total_seg_count, "/segParams/totalSegCount"),
            (params.seg_numb if params.last_seg_flag else None, "/segParams/lastSegFlag"),
        ):
            if count is None:
                continue
            if total is not None and count != total:
                raise InvalidBodyError(
                    pointer, f"says {count} segments where an earlier segment said {total}"
                )
            total = count
    if total is not None and max(known) > total:
        raise InvalidBodyError("/segParams/segNumb", f"beyond the last segment ({total})")
    # Every number from 1 to the count, not merely as many parts: a caller that skipped
    # check() may hold numbers outside that range.
    if total is None or any(n not in known for n in range(1, total + 1)):
        return None
    ordered = [known[n] for n in range(1, total + 1)]
    first = ordered[0]
    return dataclasses.replace(
        first,
        msg_id=whole_msg_id(newest),
        payload="".join(p.payload or "" for p in ordered),
        app_id=next((p.app_id for p in ordered if p.app_id is not None), None),
        deliv_st_req_ind=True if any(p.deliv_st_req_ind for p in ordered) else None,
        seg_ind=None,
        seg_params=None,
    )


async def put_downlink_segment(
    store: Store,
    message: GatewayMessageDelivery,
    *,
    service_id: str,
    pipeline: int,
    timeout: float,
    max_segments: int,
) -> PartResult:
    """Store a downlink segment; once its message is whole, queue that for the device
    (on its lane, :func:`~gatewayd.envelope.device_lane` with the transport's ``pipeline``).

    A set is named by destination, originator and ``segId``; a segment by its number in
    the set, so a resent segment is a duplicate whatever its ``msgId``. The set expires
    ``timeout`` seconds after its first segment arrived.
    """
    seg_id, seg_numb = check(message, max_segments=max_segments)
    origin = str(message.ori_addr)
    set_key = f"{service_id}|{origin}|{seg_id}"

    def whole(bodies: list[dict[str, Any]]) -> PutRequest | None:
        parts = [GatewayMessageDelivery.from_json(b["wire"]) for b in bodies]
        done = assemble(parts)
        if done is None:
            return None
        return PutRequest(
            msg_id=done.msg_id,
            dedup_key=f"down-seg:{set_key}",
            lane=device_lane(service_id, done.msg_id, pipeline),
            body=downlink_body(KIND_MESSAGE, done.to_json()),
        )

    return await store.put_part(
        PutRequest(
            msg_id=message.msg_id,
            dedup_key=f"seg:{set_key}|{seg_numb}",
            lane=set_key,
            body=downlink_body(KIND_MESSAGE, message.to_json()),
            expires_at=time.time() + timeout,
        ),
        into=Queue.DOWNLINK,
        assemble=whole,
    )
