"""The inner ring around the end-to-end tests: the relay's parts, in one process.

A real store in a temporary directory, a recording transport, and an injected clock
where time matters; no network, no gateway, no waiting out an interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from gatewayd_sim import harness
from gatewayd_sim.server import SimServer
from gatewayd_testing import MemoryTransportContext, until

from gatewayd import config
from gatewayd.api import (
    CredentialBackend,
    DeliveryOutcome,
    Device,
    Downlink,
    InvalidMessageError,
    Options,
    Transport,
    TransportSettings,
    UnknownDeviceError,
    Uplink,
    UplinkReport,
)
from gatewayd.config import RelaySettings
from gatewayd.credentials import Credentials
from gatewayd.envelope import device_lane, downlink_request, lane_service_id
from gatewayd.errors import BacklogFullError, RequestRejectedError
from gatewayd.msgin5g.model import Address, AddressType, GatewayMessageDelivery, UEMessageDelivery
from gatewayd.msgin5g.registration import GatewayRegistration
from gatewayd.northbound.client import MsgsClient, Registered
from gatewayd.northbound.registration import Registrar
from gatewayd.northbound.senders import SHARED_DRIFT_RETRIES, Senders
from gatewayd.plugins import Plugins
from gatewayd.relay import Directory, Dispatcher, ExpirySweep, TransportIntake, forget_devices
from gatewayd.retry import RetryPolicy
from gatewayd.store import (
    Item,
    PutRequest,
    Queue,
    Route,
    SqliteStore,
    Store,
    StoreSettings,
    open_store,
)
from gatewayd.store.kv import MemoryKV
from gatewayd.worker import Dead, Done, Outcome, QueueWorker, Retry

SENSOR = Device(name="sensor-1", service_id="ue-sensor-1@iot.example")
AS = Address.from_json({"addrType": "AS", "addr": "as-1"})
T0 = time.time()  # the store's max_age counts from the real creation time


def _no_credentials(name: str) -> CredentialBackend:
    raise AssertionError(f"no credentials expected: {name}")


async def _nothing(device: Device) -> None:
    pass


class Clock:
    """A wall clock that moves only when told, with a ``sleep`` that ends when it has."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.sleeps: list[float] = []  # every sleep asked for, in seconds
        self._moved = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        # Wake every sleeper; each checks its own deadline and waits on a fresh event.
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        deadline = self.now + seconds
        while self.now < deadline:
            await self._moved.wait()


def _transport_settings(
    name: str = "t", template: str | None = None, *, pipeline: int = 1
) -> TransportSettings:
    return TransportSettings(
        name=name,
        plugin="recording",
        options=Options({}, f"transports.{name}"),
        base_dir=Path(),
        devices=(SENSOR,),
        service_id_template=template,
        pipeline=pipeline,
    )


class Recording(Transport):
    def __init__(self, outcome: DeliveryOutcome | None = None) -> None:
        super().__init__(_transport_settings(), MemoryTransportContext())
        self.outcome = outcome or DeliveryOutcome.success()
        self.delivered: list[Downlink] = []
        self.reports: list[UplinkReport] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        self.delivered.append(message)
        return self.outcome

    async def deliver_report(self, report: UplinkReport) -> bool:
        self.reports.append(report)
        return True


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await SqliteStore.open(StoreSettings(path=tmp_path / "gw.db"))
    try:
        yield store
    finally:
        await store.close()


def _downlink(msg_id: str = "m1", *, report: bool = False) -> GatewayMessageDelivery:
    return GatewayMessageDelivery.from_json(
        {
            "oriAddr": {"addrType": "AS", "addr": "as-1"},
            "destAddr": {"addrType": "UE", "addr": SENSOR.service_id},
            "msgId": msg_id,
            "payload": "hello",
            **({"delivStReqInd": True} if report else {}),
        }
    )


async def _pending(store: Store, queue: Queue) -> list[Item]:
    return await store.list_items(queue=queue, state="pending", limit=100)


# --- Directory -------------------------------------------------------------------------


def test_directory_maps_learns_and_refuses_only_learned_devices() -> None:
    directory = Directory((_transport_settings("t", "{device}@learned"),))
    assert directory.device("t", "sensor-1") == SENSOR
    assert directory.endpoint(SENSOR.service_id) is not None
    learnable = directory.learnable("t", "new")
    assert learnable == Device(name="new", service_id="new@learned")
    directory.learn("t", learnable)
    assert directory.learned() == frozenset({"new@learned"})
    # A configured device is never refused by the server's say-so; a learned one is.
    assert directory.refuse(SENSOR.service_id, "NOT_ALLOWED") is None
    assert directory.refuse("new@learned", "NOT_ALLOWED") is not None
    assert directory.refused("t", "new") == "NOT_ALLOWED"
    assert directory.device("t", "new") is None
    assert directory.service_ids() == (SENSOR.service_id,)
    assert Directory((_transport_settings("u"),)).learnable("u", "x") is None


def test_directory_reconfigure_keeps_only_learned_devices_the_new_config_produces() -> None:
    """SIGHUP: a learned device stays only while its transport's template gives it the
    same UE Service ID; those of a removed transport or a changed template are dropped
    (returned for the store to forget), and so is a refusal under the old template."""
    directory = Directory(
        (
            _transport_settings("kept", "{device}@kept"),
            _transport_settings("renamed", "{device}@old"),
            _transport_settings("gone", "{device}@gone"),
        )
    )
    for transport, name in [("kept", "k"), ("renamed", "r"), ("gone", "g"), ("renamed", "x")]:
        device = directory.learnable(transport, name)
        assert device is not None
        directory.learn(transport, device)
    directory.refuse("x@old", "NOT_ALLOWED")
    directory.refuse("k@kept", "NOT_ALLOWED")
    directory.learn("kept", Device(name="k2", service_id="k2@kept"))

    dropped = directory.reconfigure(
        (
            _transport_settings("kept", "{device}@kept"),
            _transport_settings("renamed", "{device}@new"),
        )
    )

    assert sorted((e.transport, e.device.service_id) for e in dropped) == [
        ("gone", "g@gone"),
        ("renamed", "r@old"),
    ]
    assert directory.learned() == frozenset({"k2@kept"})
    assert directory.service_ids() == tuple(sorted({SENSOR.service_id, "k2@kept"}))
    assert directory.endpoint("r@old") is None
    assert directory.device("renamed", "r") is None  # learned again by its next message
    assert directory.refused("kept", "k") == "NOT_ALLOWED"
    assert directory.refused("renamed", "x") is None  # a new template: a new chance


async def test_learned_devices_the_config_no_longer_produces_are_forgotten(
    store: Store,
) -> None:
    """What the gateway does at start and on SIGHUP: restore the store's learned devices,
    forget in the store those the (new) config drops."""
    await store.learn_device("t", "a", "a@old")
    await store.learn_device("u", "b", "b@u")
    await store.learn_device("t", SENSOR.name, "sensor-1@old")  # now configured
    directory = Directory((_transport_settings("t", "{device}@old"), _transport_settings("u")))
    dropped = directory.restore(await store.learned_devices())
    await forget_devices(store, dropped, reason="not produced by the config")
    assert await store.learned_devices() == [("t", "a", "a@old")]
    assert directory.learned() == frozenset({"a@old"})

    dropped = directory.reconfigure((_transport_settings("t", "{device}@new"),))
    await forget_devices(store, dropped, reason="not produced by the config")
    assert await store.learned_devices() == []
    assert directory.learned() == frozenset()
    assert directory.service_ids() == (SENSOR.service_id,)


# --- TransportIntake -------------------------------------------------------------------


def _intake(
    store: Store, learned: list[Device] | None = None, *, pipeline: int = 1
) -> TransportIntake:
    async def on_learned(device: Device) -> None:
        (learned if learned is not None else []).append(device)

    return TransportIntake(
        name="t",
        store=store,
        directory=Directory((_transport_settings("t", "{device}@learned", pipeline=pipeline),)),
        relay=RelaySettings(
            default_destination=AS,
            reply_route_ttl=60.0,
            max_payload=2048,
            max_segments=16,
            reassembly_timeout=60.0,
        ),
        plugins=Plugins(autoload=False),
        credentials=_no_credentials,
        on_learned=on_learned,
    )


async def test_intake_stores_once_per_msg_id_and_learns_by_template(store: Store) -> None:
    learned: list[Device] = []
    intake = _intake(store, learned)
    first = await intake.accept(Uplink(device="sensor-1", payload="p", msg_id="u1"))
    again = await intake.accept(Uplink(device="sensor-1", payload="p", msg_id="u1"))
    assert (first.duplicate, again.duplicate) == (False, True)
    (item,) = await _pending(store, Queue.UPLINK)
    assert item.lane == SENSOR.service_id
    assert item.body["destAddr"] == AS.to_json()  # no route yet: the default destination
    await intake.accept(Uplink(device="newcomer", payload="p", msg_id="u2"))
    assert learned == [Device(name="newcomer", service_id="newcomer@learned")]


async def test_intake_uses_the_reply_route_written_with_the_downlink(store: Store) -> None:
    origin = {"addrType": "AS", "addr": "as-replying"}
    await store.put_many(
        Queue.DOWNLINK,
        [downlink_request(_downlink(), SENSOR.service_id, pipeline=1)],
        route=Route(SENSOR.service_id, origin, 60.0),
    )
    await _intake(store).accept(Uplink(device="sensor-1", payload="reply", msg_id="r1"))
    (item,) = await _pending(store, Queue.UPLINK)
    assert item.body["destAddr"] == origin


async def test_intake_refusals_are_precise_and_kept(store: Store) -> None:
    intake = _intake(store)
    with pytest.raises(InvalidMessageError):
        await intake.accept(Uplink(device="sensor-1", payload="\ud800", msg_id="bad"))
    intake_without_template = TransportIntake(
        name="u",
        store=store,
        directory=Directory((_transport_settings("u"),)),
        relay=intake._relay,
        plugins=Plugins(autoload=False),
        credentials=_no_credentials,
        on_learned=_nothing,
    )
    with pytest.raises(UnknownDeviceError):
        await intake_without_template.accept(Uplink(device="stranger", payload="p", msg_id="x"))
    dead = await store.list_items(queue=Queue.INTAKE, state="dead", limit=10)
    assert sorted(item.body["reason"] for item in dead) == ["invalid_message", "unknown_device"]
    assert await _pending(store, Queue.UPLINK) == []


# --- the reply route and its downlink in one transaction ---------------------------


async def test_a_refused_downlink_leaves_no_reply_route(tmp_path: Path) -> None:
    """Regression: the downlink and its reply route were two transactions."""
    store = await SqliteStore.open(StoreSettings(path=tmp_path / "full.db", max_messages=1))
    try:
        route = Route(SENSOR.service_id, {"addrType": "AS", "addr": "as-9"}, 60.0)
        await store.put_many(Queue.DOWNLINK, [downlink_request(_downlink("a"), "ue-x", pipeline=1)])
        with pytest.raises(BacklogFullError):
            await store.put_many(
                Queue.DOWNLINK,
                [downlink_request(_downlink("b"), SENSOR.service_id, pipeline=1)],
                route=route,
            )
        assert await store.route(SENSOR.service_id) is None
    finally:
        await store.close()


# --- Dispatcher --------------------------------------------------------------------


async def _dispatch(
    store: Store,
    transports: dict[str, Transport],
    message: GatewayMessageDelivery,
    *,
    pipeline: int = 1,
) -> Outcome:
    request = downlink_request(message, SENSOR.service_id, pipeline=pipeline)
    await store.put_many(Queue.DOWNLINK, [request])
    (item,) = [i for i in await _pending(store, Queue.DOWNLINK) if i.msg_id == message.msg_id]
    directory = Directory((_transport_settings(pipeline=pipeline),))
    dispatcher = Dispatcher(store=store, directory=directory, transports=transports)
    return await dispatcher.handle(item)


async def test_dispatcher_delivers_through_the_devices_transport(store: Store) -> None:
    transport = Recording()
    assert await _dispatch(store, {"t": transport}, _downlink()) == Done()
    (sent,) = transport.delivered
    assert (sent.msg_id, sent.device, sent.payload) == ("m1", SENSOR, "hello")


async def test_dispatcher_turns_evidence_into_outcomes_and_reports(store: Store) -> None:
    transient = Recording(DeliveryOutcome.failure("busy"))
    assert await _dispatch(store, {"t": transient}, _downlink("m1")) == Retry(
        "busy", peer_down=False
    )
    refused = Recording(DeliveryOutcome.failure("gone", permanent=True))
    outcome = await _dispatch(store, {"t": refused}, _downlink("m2", report=True))
    assert outcome == Dead("gone")
    (report,) = await _pending(store, Queue.REPORT)
    assert (report.msg_id, report.body["delivSt"]) == ("m2", "REPT_DELY_FAILED")


async def test_dispatcher_waits_while_the_transport_restarts(store: Store) -> None:
    outcome = await _dispatch(store, {}, _downlink())
    assert isinstance(outcome, Retry)
    assert "restarting" in outcome.error


# --- pipelining within a lane (transports.NAME.pipeline) ----------------------------


def test_device_lane_is_the_service_id_unless_pipelined() -> None:
    assert device_lane("ue-a", "m1", 1) == "ue-a"
    # Pinned: a salted hash (Python's hash()) would move messages between restarts.
    assert [device_lane("ue-a", f"u{n}", 4) for n in range(4)] == [
        "ue-a|0",
        "ue-a|2",
        "ue-a|0",
        "ue-a|2",
    ]
    assert device_lane("ue-a", "\ud800", 4).startswith("ue-a|")  # any str, as stored


def test_device_lane_spreads_over_every_sub_lane_and_maps_back() -> None:
    ids = [f"m-{n}" for n in range(200)]
    lanes = [device_lane("ue-a", i, 8) for i in ids]
    assert lanes == [device_lane("ue-a", i, 8) for i in ids]  # the same id, the same lane
    assert set(lanes) == {f"ue-a|{n}" for n in range(8)}
    assert {lane_service_id(lane) for lane in [*lanes, "ue-a"]} == {"ue-a"}
    assert lane_service_id("ue-a|as-1|seg-9") == "ue-a"  # a downlink segment set's lane


@pytest.mark.parametrize("pipeline", [1, 4])
async def test_a_devices_uplinks_are_in_flight_up_to_its_pipeline(
    store: Store, pipeline: int
) -> None:
    """Pipeline 4: four of one device's messages at the server at once. Pipeline 1: one
    at a time, in the order accepted."""
    intake = _intake(store, pipeline=pipeline)
    assert intake.pipeline == pipeline  # what the transport reads (context.pipeline)
    ids = [f"u{n}" for n in range(12)]
    for msg_id in ids:
        await intake.accept(Uplink(device="sensor-1", payload=msg_id, msg_id=msg_id))
    lanes = {item.lane for item in await _pending(store, Queue.UPLINK)}
    assert lanes == {device_lane(SENSOR.service_id, i, pipeline) for i in ids}
    assert len(lanes) == pipeline  # these ids take every sub-lane
    release = asyncio.Event()
    held: list[str] = []  # at the "server" now
    sent: list[str] = []
    most = 0

    async def handler(item: Item) -> Outcome:
        nonlocal most
        held.append(item.msg_id)
        most = max(most, len(held))
        await release.wait()
        held.remove(item.msg_id)
        sent.append(item.msg_id)
        return Done()

    worker = QueueWorker(store, Queue.UPLINK, handler, policy=RetryPolicy(), concurrency=64)
    run = asyncio.create_task(worker.run(), name="worker:test")
    try:
        await until(lambda: len(held) == pipeline, what=f"{pipeline} in flight")
        # Every lane with work is busy: the store hands out nothing more.
        assert await store.take(Queue.UPLINK, limit=64) == []
        release.set()
        await until(lambda: len(sent) == len(ids) and not worker.in_flight)
    finally:
        await worker.stop(1.0)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert most == pipeline
    assert sorted(sent) == sorted(ids)
    if pipeline == 1:
        assert sent == ids


async def test_a_pipelined_message_keeps_one_lane_for_its_segments_and_its_report(
    store: Store,
) -> None:
    await _intake(store, pipeline=4).accept(
        Uplink(device="sensor-1", payload="x" * 5000, msg_id="big")
    )
    parts = await _pending(store, Queue.UPLINK)
    assert len(parts) == 3  # over relay.max_payload (2048): segments
    assert {p.lane for p in parts} == {device_lane(SENSOR.service_id, "big", 4)}
    transport = Recording()
    outcome = await _dispatch(store, {"t": transport}, _downlink("m2", report=True), pipeline=4)
    assert outcome == Done()
    (report,) = await _pending(store, Queue.REPORT)
    assert report.lane == device_lane(SENSOR.service_id, "m2", 4) == f"{SENSOR.service_id}|1"


# --- QueueWorker -------------------------------------------------------------------


async def test_worker_settles_outcomes_on_an_injected_clock(store: Store) -> None:
    clock = Clock()
    seen: list[str] = []
    outcomes = {"a": Done(), "b": Retry("later", peer_down=False), "c": Dead("no")}

    async def handler(item: Item) -> Outcome:
        seen.append(item.msg_id)
        return outcomes[item.msg_id]

    for msg_id in "abc":
        await store.put_many(
            Queue.UPLINK,
            [PutRequest(msg_id=msg_id, dedup_key=msg_id, lane=msg_id, body={"m": msg_id})],
        )
    worker = QueueWorker(
        store,
        Queue.UPLINK,
        handler,
        policy=RetryPolicy(initial=5.0, maximum=5.0, jitter=0.0),
        concurrency=4,
        clock=clock,
    )
    run = asyncio.create_task(worker.run(), name="worker:test")
    try:
        await until(lambda: len(seen) == 3 and not worker.in_flight)
        (waiting,) = await _pending(store, Queue.UPLINK)
        assert waiting.msg_id == "b"
        assert waiting.not_before == pytest.approx(T0 + 5.0)
        dead = await store.list_items(queue=Queue.UPLINK, state="dead", limit=10)
        assert [i.msg_id for i in dead] == ["c"]
        clock.now += 5.0  # the backoff has passed on the worker's clock
        outcomes["b"] = Done()
        await until(lambda: len(seen) == 4 and not worker.in_flight)
        assert await _pending(store, Queue.UPLINK) == []
        assert sorted(seen) == ["a", "b", "b", "c"]
        assert seen[-1] == "b"
    finally:
        await worker.stop(1.0)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


# --- ExpirySweep -------------------------------------------------------------------


async def test_expiry_sweep_runs_on_its_clock_and_stores_the_report(store: Store) -> None:
    clock = Clock()
    message = _downlink("e1", report=True)
    request = downlink_request(message, SENSOR.service_id, pipeline=1)
    await store.put_many(
        Queue.DOWNLINK,
        [
            PutRequest(
                msg_id=request.msg_id,
                dedup_key=request.dedup_key,
                lane=request.lane,
                body=request.body,
                expires_at=T0 + 30,
            )
        ],
    )
    dispatcher = Dispatcher(
        store=store, directory=Directory((_transport_settings(),)), transports={}
    )
    sweep = ExpirySweep(store, dispatcher, interval=0.01, clock=clock)
    assert await sweep.sweep() == []
    clock.now += 31
    (expired,) = await sweep.sweep()
    assert expired.msg_id == "e1"
    (report,) = await _pending(store, Queue.REPORT)
    assert (report.msg_id, report.body["failureCause"]) == ("e1", "EXPIRED")


# --- Registrar -----------------------------------------------------------------------


class CountingClient(MsgsClient):
    """The real client, counting the registration requests it sends (POST and PUT)."""

    sent = 0

    async def register(self, registration: GatewayRegistration) -> Registered:
        self.sent += 1
        return await super().register(registration)

    async def update(self, location: str, registration: GatewayRegistration) -> Registered:
        self.sent += 1
        return await super().update(location, registration)


@contextlib.asynccontextmanager
async def _sim_client(
    gateway_config: Callable[..., config.Settings],
) -> AsyncIterator[tuple[config.Settings, CountingClient]]:
    """A northbound client for the reference server (loopback, in this process)."""
    settings = gateway_config(harness.http_transport_bearer())
    credentials = Credentials(settings, Plugins())
    await credentials.load()
    client = CountingClient(
        settings.northbound.api_root,
        credentials.client_tls(),
        server_name=settings.northbound.server_name,
        timeout=5.0,
        max_connections=2,
    )
    try:
        yield settings, client
    finally:
        await client.aclose()
        await credentials.aclose()


def _registrar(
    settings: config.Settings, client: MsgsClient, ids: Callable[[], tuple[str, ...]], **kw: Any
) -> Registrar:
    return Registrar(
        client,
        gateway_id=settings.gateway_id,
        gateway_type="N3G",
        target_uri="https://127.0.0.1:1",
        service_ids=ids,
        policy=RetryPolicy(initial=0.1, maximum=0.5),
        **{"ttl": 600.0, **kw},
    )


@contextlib.asynccontextmanager
async def _running(registrar: Registrar) -> AsyncIterator[None]:
    run = asyncio.create_task(registrar.run(), name="registration:test")
    try:
        yield
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await registrar.deregister(5.0)


async def test_registrar_registers_updates_on_a_learned_device_and_deregisters(
    sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    """Against the reference server (loopback, in this process): the registration holds
    the served ids, a learned device is added by an update in place, the stop deletes it."""
    ids = ["ue-a@iot.example"]
    async with _sim_client(gateway_config) as (settings, client):
        registrar = _registrar(settings, client, lambda: tuple(ids))
        async with _running(registrar):
            await asyncio.wait_for(registrar.ready.wait(), timeout=10)
            (held,) = sim.registrations
            assert tuple(held.ue_svc_ids) == ("ue-a@iot.example",)
            ids.append("ue-b@iot.example")
            registrar.changed()
            await sim.wait_for(
                lambda: "ue-b@iot.example" in sim.registrations[0].ue_svc_ids, timeout=10
            )
            assert len(sim.registrations) == 1  # updated in place
        assert sim.registrations == []


async def test_registrars_sharing_a_store_keep_one_registration_with_every_device(
    sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    """Two instances on one store: the second updates the registration the first made
    (its location is in the shared kv) instead of replacing it with its own, and syncs
    what the other learned before, so the one registration holds both devices."""
    shared = MemoryKV()
    learned = {"a": {"ue-a@iot.example"}, "b": {"ue-b@iot.example"}}
    in_store: set[str] = set()

    def instance(name: str) -> Callable[[], tuple[str, ...]]:
        return lambda: tuple(sorted(learned[name]))

    async def sync(name: str) -> None:  # the daemon's directory sync, in small
        in_store.update(learned[name])
        learned[name] |= in_store

    async with _sim_client(gateway_config) as (settings, client):
        one = _registrar(
            settings, client, instance("a"), shared=shared, before_update=lambda: sync("a")
        )
        two = _registrar(
            settings, client, instance("b"), shared=shared, before_update=lambda: sync("b")
        )
        run = asyncio.create_task(one.run(), name="registration:one")
        try:
            await asyncio.wait_for(one.ready.wait(), timeout=10)
            async with _running(two):
                await asyncio.wait_for(two.ready.wait(), timeout=10)
                (held,) = sim.registrations
                assert set(held.ue_svc_ids) == {"ue-a@iot.example", "ue-b@iot.example"}
                assert client.sent == 2  # one POST, then a PUT to the same registration
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


async def test_registrar_refreshes_at_two_thirds_of_the_granted_lifetime_on_its_clock(
    sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    """The refresh is due at 2/3 of what the server granted (its max_ttl caps the 7200 s
    asked for), counted on the registrar's clock; moving that clock sends it."""
    clock = Clock(time.time())
    async with _sim_client(gateway_config) as (settings, client):
        registrar = _registrar(
            settings,
            client,
            lambda: ("ue-a@iot.example",),
            ttl=7200.0,
            clock=clock,
            sleep=clock.sleep,
        )
        async with _running(registrar):
            await until(lambda: len(clock.sleeps) == 1)
            granted = sim.registrations[0].expiry.timestamp()
            assert granted - clock.now < 3601  # the server's cap, not the 7200 s asked
            assert clock.sleeps[0] == pytest.approx((granted - clock.now) * 2 / 3, abs=1)
            assert client.sent == 1
            clock.advance(clock.sleeps[0])
            await until(lambda: len(clock.sleeps) == 2)
            assert client.sent == 2  # refreshed, once
            granted = sim.registrations[0].expiry.timestamp()
            assert clock.sleeps[1] == pytest.approx((granted - clock.now) * 2 / 3, abs=1)


async def test_registrar_sifts_refused_learned_devices_and_registers_one_learned_meanwhile(
    sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    """The server (allowing ``ue-*``) refuses one of 16 newly learned ids: the sift finds
    it without an update per id, and a device learned during the sift is registered
    right after it, not at the next refresh (which the frozen clock never brings)."""
    clock = Clock(time.time())
    configured = {"ue-a@iot.example"}
    learned = {f"ue-l{n:02}@learned.example" for n in range(15)} | {"meter-7@learned.example"}
    late = "ue-late@learned.example"
    async with _sim_client(gateway_config) as (settings, client):

        async def refused(service_id: str, cause: str) -> None:
            learned.discard(service_id)  # as the directory does
            learned.add(late)  # learned while the sift goes on
            registrar.changed()

        registrar = _registrar(
            settings,
            client,
            lambda: tuple(sorted(configured | learned)),
            learned=lambda: frozenset(learned),
            on_device_refused=refused,
            clock=clock,
            sleep=clock.sleep,
        )
        async with _running(registrar):
            await sim.wait_for(
                lambda: bool(sim.registrations) and late in sim.registrations[0].ue_svc_ids,
                timeout=10,
            )
            assert registrar.refused_ids == {"meter-7@learned.example": "SERVICE_ID_NOT_ALLOWED"}
            assert set(sim.registrations[0].ue_svc_ids) == configured | learned
            # The refused first try, the configured id alone, then a bisection (one id
            # at a time would be 16 updates), then the update with the late device.
            assert client.sent <= 1 + 1 + 8 + 1


class _Refusing:
    """A northbound client whose server says "not a UE you registered" to every uplink."""

    def __init__(self) -> None:
        self.sent = 0

    async def deliver_ue_message(self, message: UEMessageDelivery) -> None:
        self.sent += 1
        raise RequestRejectedError(
            403, "oriAddr is not a UE this gateway registered", cause="SERVICE_ID_NOT_ALLOWED"
        )


class _Registered:
    def __init__(self) -> None:
        self.lost_count = 0

    async def ensure(self, service_id: str) -> None:
        return None  # registered, as far as this instance knows

    def lost(self) -> None:
        self.lost_count += 1


@pytest.mark.parametrize("shared", [False, True])
async def test_an_unregistered_ue_refusal_is_drift_only_with_a_shared_store(
    store: Store, shared: bool
) -> None:
    """Alone, the server's "not a UE you registered" is final (DLQ). With instances
    sharing the store it means another instance's registration replaced ours: register
    again and retry, a few times, then final."""
    client, registrar = _Refusing(), _Registered()
    directory = Directory(())
    senders = Senders(client, registrar, store, directory, shared=shared)  # type: ignore[arg-type]
    body = UEMessageDelivery(
        ori_addr=Address(addr_type=AddressType.UE, addr="ue-a@iot.example"),
        dest_addr=Address(addr_type=AddressType.AS, addr="as-1"),
        msg_id="m1",
        sto_and_fw_ind=True,
        payload="hi",
    ).to_json()
    item_id = (await store.put(Queue.UPLINK, msg_id="m1", dedup_key="m1", lane="a", body=body)).id
    item = await store.get(item_id)
    assert item is not None
    first = await senders.uplink(item)
    if not shared:
        assert isinstance(first, Dead)
        assert registrar.lost_count == 0
        return
    assert isinstance(first, Retry)
    assert first.answered  # the server is up: the breaker closes
    assert registrar.lost_count == 1
    worn = dataclasses.replace(item, attempts=SHARED_DRIFT_RETRIES)
    assert isinstance(await senders.uplink(worn), Dead)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_nul_in_a_device_id_is_stored_and_sent_on_every_backend(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """A msgId with U+0000 is valid JSON. PostgreSQL text cannot hold the character: its
    store escapes it (gatewayd.store.pg_text), so the message is stored and its id comes
    back whole on either backend, and a redelivery is still a duplicate."""
    settings = StoreSettings(path=tmp_path / "gw.db")
    if backend == "postgresql":
        dsn: str = request.getfixturevalue("postgres_dsn")
        settings = StoreSettings(path=tmp_path / "gw.db", backend="postgresql", dsn=dsn)
    store = await open_store(settings)
    try:
        intake = _intake(store)
        uplink = Uplink(device="sensor-1", payload="x\x00y", msg_id="a\x00b")
        assert not (await intake.accept(uplink)).duplicate
        assert (await intake.accept(uplink)).duplicate
        (item,) = await _pending(store, Queue.UPLINK)
        assert item.msg_id == "a\x00b"
        assert UEMessageDelivery.from_json(item.body).msg_id == "a\x00b"
        assert item.body["payload"] == "x\x00y"
    finally:
        await store.close()
