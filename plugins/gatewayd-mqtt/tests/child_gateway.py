"""A gateway process whose accept() never returns: the parent kills it with SIGKILL.

Usage: python child_gateway.py PORT CLIENT_ID. Prints "ENTERED <msg_id>" once the
transport handed a message to accept(), i.e. the message was received but not stored.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from gatewayd_mqtt.transport import MqttTransport
from mqtt_helpers import TEMPLATE

from gatewayd.api import Acceptance, Options, TransportSettings, Uplink


class BlockedContext:
    pipeline = 1  # transports.NAME.pipeline: per-device order, as by default

    def __init__(self) -> None:
        import structlog

        self.log = structlog.get_logger("child")

    def device(self, name: str) -> None:
        return None

    async def accept(self, uplink: Uplink) -> Acceptance:
        print("ENTERED", uplink.msg_id, flush=True)
        await asyncio.Event().wait()  # the store never commits
        raise AssertionError("unreachable")


async def main(port: int, client_id: str) -> None:
    settings = TransportSettings(
        name="child",
        plugin="mqtt",
        options=Options({"port": port, "client_id": client_id}, "transports.child"),
        base_dir=Path(),
        service_id_template=TEMPLATE,
    )
    transport = MqttTransport(settings, BlockedContext())  # type: ignore[arg-type]
    await transport.start()
    print("READY", flush=True)
    await transport.run()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
