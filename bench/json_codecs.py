"""Would orjson or msgspec pay for themselves on the wire model? (issue 12)

    .venv/bin/python bench/json_codecs.py

Per uplink message the gateway does JSON work four times: it decodes the device's
JSON, encodes the stored body, encodes the ``UEMessageDelivery`` POST and decodes the
server's ``MessageDeliveryAck``. This times those four on a typical message with the
standard library, orjson and msgspec (each if installed: they are not dependencies),
in CPU microseconds per message, next to the gateway's measured total per message
(docs/performance.md), so the saving can be read as a share of it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from gatewayd.msgin5g.model import Address, AddressType, UEMessageDelivery

ROUNDS = 50_000
GATEWAY_US_PER_MSG = 1_200  # gateway CPU per message at saturation, docs/performance.md

DEVICE_JSON = b'{"msgId":"sensor-17-000042","payload":"temperature=21.5 humidity=40","appId":"env"}'
ACK_JSON = b'{"status":"DELY_STORED"}'


def wire() -> dict[str, Any]:
    return UEMessageDelivery(
        ori_addr=Address(addr_type=AddressType.UE, addr="ue-sensor-17@iot.example"),
        dest_addr=Address(addr_type=AddressType.AS, addr="as-telemetry@iot.example"),
        msg_id="sensor-17-000042",
        sto_and_fw_ind=True,
        app_id="env",
        payload="temperature=21.5 humidity=40",
    ).to_json()


def per_message(loads: Callable[[bytes], Any], dumps: Callable[[Any], bytes]) -> float:
    """CPU µs for one message's four JSON steps."""
    body = {"kind": "message", "wire": wire()}
    start = time.process_time()
    for _ in range(ROUNDS):
        loads(DEVICE_JSON)
        dumps(body)
        dumps(body["wire"])
        loads(ACK_JSON)
    return 1e6 * (time.process_time() - start) / ROUNDS


def main() -> int:
    codecs: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
        "json (stdlib)": (
            json.loads,
            lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode(),
        ),
    }
    try:
        import orjson

        codecs["orjson"] = (orjson.loads, orjson.dumps)
    except ImportError:
        print("orjson is not installed: pip install orjson", file=sys.stderr)
    try:
        import msgspec

        codecs["msgspec"] = (msgspec.json.decode, msgspec.json.encode)
    except ImportError:
        print("msgspec is not installed: pip install msgspec", file=sys.stderr)
    base = None
    share = f"share of {GATEWAY_US_PER_MSG} µs/msg"
    print(f"| codec | CPU µs/msg (4 JSON steps) | saving vs stdlib | {share} |")
    print("|---|---|---|---|")
    for name, (loads, dumps) in codecs.items():
        cost = min(per_message(loads, dumps) for _ in range(3))
        base = cost if base is None else base
        saving = base - cost
        print(f"| {name} | {cost:.1f} | {saving:.1f} | {100 * saving / GATEWAY_US_PER_MSG:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
