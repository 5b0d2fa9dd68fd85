"""Helpers for the multi-instance tests: gateway processes on one PostgreSQL store.

- :func:`store_toml`: the ``[store]`` table of a gateway on a database of the kit's
  :class:`~gatewayd_testing.postgres.PostgresServer`, the password given by reference
  (:data:`PASSWORD_ENV`), as the config demands;
- :class:`Instance`: :class:`loadgen.GatewayProcess` with that password in its
  environment, whose ``url`` is the HTTP transport's when it has one and ``None``
  otherwise (an MQTT-only instance);
- :class:`ArrivalSim`: the reference server, noting when each uplink arrived and
  whether it was a first arrival or a resend;
- :func:`lanes_held`: what a (killed) instance had taken, from the lanes table.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from gatewayd_sim.server import SimServer
from gatewayd_testing.postgres import PASSWORD, PostgresServer
from loadgen import GatewayProcess

PASSWORD_ENV = "GATEWAYD_TEST_PG_PASSWORD"


def store_toml(server: PostgresServer, database: str, *, lease: float) -> str:
    return f"""
[store]
backend = "postgresql"
dsn = "{server.dsn(database, password=False)}"
password = {{ env = "{PASSWORD_ENV}" }}
lease = {lease}
pool_size = 4
"""


class Instance(GatewayProcess):
    """One gateway instance as a process; the store's password in its environment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env[PASSWORD_ENV] = PASSWORD

    def _listening_port(self) -> int:
        for event in self.events():
            if event.get("event") == "http.listening":
                return int(event["port"])
        return 0  # no HTTP transport: no device-facing URL

    @property
    def url(self) -> str | None:
        return None if not self.port else f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # time.monotonic() when the request came in
    msg_id: str
    payload: str | None
    first: bool  # False: a resend of a msgId the server already had


class ArrivalSim(SimServer):
    """The reference server; every uplink POST is noted in :attr:`arrivals`. ``delay``
    holds each answer back a little, so the gateway's lanes are busy when it dies."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.arrivals: list[Arrival] = []

    async def _uplink(self, request: web.Request) -> web.StreamResponse:
        began = time.monotonic()
        if self.delay:
            await asyncio.sleep(self.delay)
        body = json.loads(await request.read())  # aiohttp keeps the body for super()
        before = len(self.uplinks)
        answer = await super()._uplink(request)
        self.arrivals.append(
            Arrival(
                at=began,
                msg_id=str(body["msgId"]),
                payload=body.get("payload"),
                first=len(self.uplinks) > before,
            )
        )
        return answer


def lanes_held(server: PostgresServer, database: str, pid: int) -> dict[str, str]:
    """The uplink lanes an instance (by its process id) holds, and each one's head's
    msgId: the items it had taken and not settled."""
    rows = server.execute(
        "SELECT l.lane, i.msg_id FROM lanes l JOIN items i ON i.id = l.head"
        " WHERE l.queue = 'uplink' AND split_part(l.owner, '/', 2) = %s",
        (str(pid),),
        database=database,
    )
    return {str(lane): str(msg_id) for lane, msg_id in rows}


def pending(server: PostgresServer, database: str) -> int:
    rows = server.execute("SELECT count(*) FROM items WHERE state = 'pending'", database=database)
    return int(rows[0][0])
