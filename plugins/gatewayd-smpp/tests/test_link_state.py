"""The link state ``gatewayd status`` shows for an SMPP transport: bound / binding /
unbound, bound sessions against the configured pool, and rebinds."""

from __future__ import annotations

import asyncio

from conftest import SmsContext, Starter, base_options, make_settings
from gatewayd_smpp.transport import SmppTransport
from gatewayd_testing import until
from smsc_peer import Smsc


async def test_a_pool_is_bound_unbound_while_the_smsc_is_down_and_rebinds(
    smsc: Smsc, start_transport: Starter
) -> None:
    transport, _ = await start_transport(binds=2)
    await until(lambda: transport.link_state()["binds"] == "2/2")
    assert transport.link_state() == {"state": "bound", "binds": "2/2", "rebinds": 0}

    port = smsc.port
    await smsc.stop()
    await until(lambda: transport.link_state()["binds"] == "0/2")
    # Nothing listens: each link is either waiting out its backoff or trying again.
    assert transport.link_state()["state"] in ("unbound", "binding")
    assert transport.link_state()["rebinds"] == 0

    await smsc.start(port)
    await until(lambda: transport.link_state()["state"] == "bound")
    assert transport.link_state() == {"state": "bound", "binds": "2/2", "rebinds": 2}


async def test_an_smsc_that_never_answers_the_bind_leaves_it_binding() -> None:
    """A TCP peer that accepts and stays silent: the bind is under way, not bound."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = make_settings(base_options(port, response_timeout=5.0))
        transport = SmppTransport(settings, SmsContext(settings.devices))
        assert transport.link_state() == {"state": "unbound", "binds": "0/1", "rebinds": 0}
        await transport.start()
        await until(lambda: bool(held))
        assert transport.link_state() == {"state": "binding", "binds": "0/1", "rebinds": 0}
        await transport.stop()
        assert transport.link_state()["state"] == "unbound"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_split_binds_count_the_receiver(start_strict: Starter) -> None:
    """The npm SMSC only takes transceivers; the strict one (Jasmin's codec) takes both."""
    transport, _ = await start_strict(binds=1, bind_mode="split")
    await until(lambda: transport.link_state()["state"] == "bound")
    assert transport.link_state()["binds"] == "2/2"  # one transmitter, one receiver
