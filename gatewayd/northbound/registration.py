"""Registration on behalf of the devices we serve (our MSGS_GWRegistration extension).

The registrar registers at start, refreshes at two thirds of the granted lifetime, sends
an update when a device is learned, and deregisters on stop. While the server is
unreachable it keeps trying with backoff; device intake goes on meanwhile (messages wait
in the store), but nothing is sent before the registration holds.

Time comes from an injectable ``clock`` (wall time: the server's expiry is a date) and
``sleep``, so a test can move time instead of waiting it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from gatewayd.api import KeyValueStore
from gatewayd.errors import (
    DeviceRefusedError,
    PeerRefusedError,
    PeerUnavailableError,
    RequestRejectedError,
    StoreError,
)
from gatewayd.msgin5g.registration import GatewayRegistration
from gatewayd.northbound.client import MsgsClient
from gatewayd.retry import RetryPolicy

log = structlog.get_logger(__name__)

SHARED_LOCATION_KEY = "location"  # in the ``shared`` table: the cluster's registration


class Registrar:
    def __init__(
        self,
        client: MsgsClient,
        *,
        gateway_id: str,
        gateway_type: str,
        target_uri: str,
        service_ids: Callable[[], tuple[str, ...]],
        ttl: float,
        policy: RetryPolicy,
        learned: Callable[[], frozenset[str]] = frozenset,
        on_device_refused: Callable[[str, str], Awaitable[None]] | None = None,
        on_registered: Callable[[], None] | None = None,
        shared: KeyValueStore | None = None,
        before_update: Callable[[], Awaitable[object]] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Coroutine[Any, Any, None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._gateway_id = gateway_id
        self._gateway_type = gateway_type
        self._target_uri = target_uri
        self._service_ids = service_ids
        self._ttl = ttl
        self._policy = policy
        self._learned = learned
        self._on_device_refused = on_device_refused
        self._on_registered = on_registered
        # Several instances on one store keep ONE registration: its location is in the
        # store (``shared``), each updates that one. A server holds one registration per
        # gateway, so an instance creating its own would replace the others', and their
        # devices learned since would be refused (403) until they noticed.
        # ``before_update``: learn what the others learned first, so an update does not
        # drop their devices from the id set.
        self._shared = shared
        self._before_update = before_update
        self._clock = clock
        self._sleep = sleep
        self._location: str | None = None
        self._registered_ids: frozenset[str] = frozenset()
        self._expires = 0.0
        self._changed = asyncio.Event()
        self._updated = asyncio.Condition()
        self.ready = asyncio.Event()  # set while a registration holds
        self.refused: PeerRefusedError | None = None
        # Learned UE Service IDs the server refused (a 403 on the update that added
        # them): those devices are refused, never the gateway (see _sift).
        self.refused_ids: dict[str, str] = {}

    @property
    def expires(self) -> float | None:
        """When the registration the server granted ends (unix time), if one holds."""
        return self._expires if self.ready.is_set() else None

    def _body(self, ids: tuple[str, ...] | None = None) -> GatewayRegistration:
        return GatewayRegistration(
            gw_id=self._gateway_id,
            gw_type=self._gateway_type,
            target_uri=self._target_uri,
            ue_svc_ids=self._service_ids() if ids is None else ids,
            expiry=datetime.fromtimestamp(self._clock(), UTC) + timedelta(seconds=self._ttl),
        )

    async def run(self) -> None:
        """Keep the registration alive until cancelled. Returns if the server refuses us:
        a refusal is a config or credential problem no retry can fix (see ``refused``)."""
        attempt = 0
        while True:
            if not self._service_ids():
                # The registration needs at least one UE Service ID: a gateway that only
                # learns its devices (service_id_template) registers with the first one.
                log.info("registration.deferred", reason="no UE Service IDs yet")
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                try:
                    await self._register_or_update()
                except RequestRejectedError as exc:
                    if exc.status != 403 or not self._untried():
                        raise
                    await self._sift(exc)
                attempt = 0
            except (PeerRefusedError, RequestRejectedError) as exc:
                # Either way a config or credential problem that no retry can fix.
                self.refused = (
                    exc
                    if isinstance(exc, PeerRefusedError)
                    else PeerRefusedError(f"the MSGin5G server refused the registration: {exc}")
                )
                self.ready.clear()
                log.error("registration.refused", error=str(exc))
                return
            except PeerUnavailableError as exc:
                attempt += 1
                delay = self._policy.delay(attempt, retry_after=exc.retry_after)
                log.warning("registration.retry", error=str(exc), delay=round(delay, 2))
                await self._sleep_until_change(delay)
                continue
            # Refresh at two thirds of the lifetime the server granted, or sooner on a change.
            await self._sleep_until_change(max((self._expires - self._clock()) * 2 / 3, 1.0))

    def _untried(self) -> frozenset[str]:
        """Learned ids the server has not accepted yet: the suspects of a 403."""
        return self._learned() - self._registered_ids

    async def _sift(self, first: RequestRejectedError) -> None:
        """A 403 on a registration that carries learned ids the server never accepted:
        find out whether the server refuses the gateway or only some devices.

        The ids the server accepted before (and the configured ones) go first, alone: a
        refusal of those is the gateway's own (exit 3). Then the new learned ids are
        bisected: a group the server accepts is registered whole, a refused one is split
        until each refused id stands alone and refuses that device only. With few
        refused ids that is a handful of updates, not one per learned device.

        The updates here carry chosen ids, so they leave a pending change set (see
        :meth:`_register_or_update`): a device learned meanwhile is registered by the
        next update of the whole set, which run() sends at once.
        """
        suspects = self._untried()
        base = tuple(i for i in self._service_ids() if i not in suspects)
        if base:
            await self._register_or_update(base)
        log.warning("registration.sifting", suspects=len(suspects), cause=first.cause)
        # One update per group; the registration holds one id set, so updates of it
        # cannot run concurrently (each would replace the others' ids).
        groups = _halves(tuple(sorted(suspects)))
        while groups:
            group = groups.pop(0)
            try:
                await self._register_or_update(tuple(sorted(self._registered_ids | set(group))))
            except RequestRejectedError as exc:
                if exc.status != 403:
                    raise
                if len(group) > 1:
                    groups[:0] = _halves(group)
                else:
                    await self._refuse_device(group[0], exc.cause or f"HTTP {exc.status}")
        async with self._updated:
            self._updated.notify_all()

    async def _refuse_device(self, service_id: str, cause: str) -> None:
        self.refused_ids[service_id] = cause
        if self._on_device_refused is not None:
            await self._on_device_refused(service_id, cause)

    async def _register_or_update(self, ids: tuple[str, ...] | None = None) -> None:
        if self._shared is not None:
            await self._adopt_shared()
        body = self._body(ids)
        if ids is None:
            # This update carries every served id: changes so far are in it. One that
            # carries chosen ids (a sift) leaves a pending change pending.
            self._changed.clear()
        if self._location is None:
            result = await self._client.register(body)
            self._location = result.location
            event = "registration.created"
            await self._share(result.location)
        else:
            try:
                result = await self._client.update(self._location, body)
                event = "registration.refreshed"
            except RequestRejectedError as exc:
                if exc.status != 404:
                    raise
                # The server forgot us (restart, expiry): register afresh.
                self._location = None
                result = await self._client.register(body)
                self._location = result.location
                event = "registration.created"
                await self._share(result.location)
        self._expires = result.ack.expiry.timestamp()
        self._registered_ids = frozenset(body.ue_svc_ids)
        log.info(
            event,
            location=self._location,
            service_ids=len(body.ue_svc_ids),
            expires=result.ack.expiry.isoformat(),
        )
        self.ready.set()
        if self._on_registered is not None:
            self._on_registered()  # the server answered: a breaker may close now
        async with self._updated:
            self._updated.notify_all()

    async def _adopt_shared(self) -> None:
        """Update the registration the instances share (another may have made it)."""
        try:
            if self._before_update is not None:
                await self._before_update()
            assert self._shared is not None
            stored = await self._shared.get(SHARED_LOCATION_KEY)
        except StoreError as exc:
            log.warning("registration.shared_unreadable", error=str(exc))
            return
        if stored is not None:
            self._location = stored

    async def _share(self, location: str) -> None:
        if self._shared is None:
            return
        try:
            await self._shared.put(SHARED_LOCATION_KEY, location, ttl=self._ttl * 2)
        except StoreError as exc:
            log.warning("registration.shared_unwritten", error=str(exc))

    async def _sleep_until_change(self, seconds: float) -> None:
        """``seconds`` on the injected sleep, or until a change, whichever comes first."""
        waits: tuple[asyncio.Task[Any], ...] = (
            asyncio.create_task(self._changed.wait(), name="registration:change"),
            asyncio.create_task(self._sleep(seconds), name="registration:sleep"),
        )
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # The loser, or both when run() is cancelled: none outlives this wait.
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def changed(self) -> None:
        """The set of served UE Service IDs grew: send an update soon."""
        self._changed.set()

    def lost(self) -> None:
        """The server says it holds no registration of ours (it restarted without it):
        register again, and hold senders in :meth:`ensure` until that is done."""
        self._registered_ids = frozenset()
        self._changed.set()

    async def ensure(self, service_id: str) -> None:
        """Wait until ``service_id`` is part of the registration the server holds.

        Raises :class:`DeviceRefusedError` when the server refused it."""
        if service_id in self._registered_ids:
            return
        if service_id not in self.refused_ids:
            self.changed()
            async with self._updated:
                await self._updated.wait_for(
                    lambda: service_id in self._registered_ids or service_id in self.refused_ids
                )
        if service_id in self.refused_ids:
            raise DeviceRefusedError(
                f"the MSGin5G server refused UE Service ID {service_id}: "
                f"{self.refused_ids[service_id]}"
            )

    async def deregister(self, timeout: float) -> None:
        if self._location is None:
            return
        try:
            await asyncio.wait_for(self._client.deregister(self._location), timeout)
            log.info("registration.deleted", location=self._location)
        except (PeerUnavailableError, RequestRejectedError, PeerRefusedError, TimeoutError) as exc:
            log.warning("registration.delete_failed", error=str(exc))
        self._location = None
        self.ready.clear()


def _halves(ids: tuple[str, ...]) -> list[tuple[str, ...]]:
    """``ids`` cut in two (one id stays whole): the next groups of a bisection."""
    if len(ids) <= 1:
        return [ids] if ids else []
    middle = len(ids) // 2
    return [ids[:middle], ids[middle:]]
