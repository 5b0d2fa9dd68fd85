"""The stop budget and the supervision of transports.

Stop budget (docs/architecture.md "Stopping"): one deadline, ``gateway.drain_timeout``
after the stop began, bounds the drain; the transports then get what is left of it but
at least ``TRANSPORT_STOP_SECONDS``, the deregistration at least
``DEREGISTER_MIN_SECONDS``. :func:`stop_budget` is the worst case, which must fit in the
unit's ``TimeoutStopSec`` (a test checks it against systemd/gatewayd.service).

A transport is one task ``transport:NAME`` in the gateway's task group: started, run,
and, when it raises (at start or in ``run``), logged with its name and started again as
a new instance after a backoff. It never takes the daemon or another transport down.
A ``stop()`` that outlives its share of the deadline is abandoned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from gatewayd.api import Transport, TransportContext, TransportFactory, TransportSettings

log = structlog.get_logger(__name__)

TRANSPORT_STOP_SECONDS = 2.0
# Even with the drain budget spent, a live server gets this long to drop our registration.
DEREGISTER_MIN_SECONDS = 0.5
# The store's writer and the sockets closing after the deregistration.
CLOSE_SECONDS = 1.0
# Restart backoff for a failing transport: doubles from the first to the cap, and starts
# over once an instance has run for RESTART_MAX_SECONDS.
RESTART_FIRST_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0


def stop_budget(drain_timeout: float) -> float:
    """The longest a graceful stop takes with ``gateway.drain_timeout``."""
    return drain_timeout + TRANSPORT_STOP_SECONDS + DEREGISTER_MIN_SECONDS + CLOSE_SECONDS


class StopDeadline:
    """The one deadline of a stop; each step asks for its share with :meth:`left`."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.at = clock() + seconds

    def left(self, minimum: float = 0.0) -> float:
        return max(self.at - self._clock(), minimum)


async def stop_within(transport: Transport, seconds: float) -> bool:
    """``transport.stop()``, abandoned (not awaited further) after ``seconds``.

    Returns whether it finished. A failure is logged with the transport's name.
    """
    task = asyncio.create_task(transport.stop(), name=f"transport:{transport.name}:stop")
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()  # a stop() that ignores this is left to the loop's end
        log.error("transport.stop_abandoned", transport=transport.name, after=seconds)
        return False
    exc = task.exception()
    if exc is not None:
        log.error("transport.stop_failed", transport=transport.name, error=repr(exc), exc_info=exc)
        return False
    log.info("transport.stopped", transport=transport.name)
    return True


class TransportSupervisor:
    """One configured transport, kept running in ``transports[name]`` while it is up."""

    def __init__(
        self,
        settings: TransportSettings,
        factory: TransportFactory,
        context: TransportContext,
        transports: dict[str, Transport],
        *,
        stop_seconds: float = TRANSPORT_STOP_SECONDS,
    ) -> None:
        self.settings = settings
        self._factory = factory
        self._context = context
        self._transports = transports
        self._stop_seconds = stop_seconds
        self.restarts = 0

    @property
    def name(self) -> str:
        return self.settings.name

    async def start(self) -> Transport:
        """Build and start one instance; what it raises is the caller's to judge."""
        transport = self._factory(self.settings, self._context)
        await transport.start()
        self._transports[self.name] = transport
        log.info("transport.started", transport=self.name, plugin=self.settings.plugin)
        return transport

    async def run(self, started: Transport | None) -> None:
        """Run ``started`` (or start one), restarting after each failure, until cancelled.

        On cancellation the instance in ``transports`` stays for the caller to stop
        within the stop deadline.
        """
        transport = started
        failures = 0
        while True:
            if transport is None:
                try:
                    transport = await self.start()
                except Exception as exc:
                    self.failed("start", exc)
                    failures += 1
                    await asyncio.sleep(_backoff(failures))
                    continue
            since = time.monotonic()
            try:
                await transport.run()
                # A listener-based transport has no loop: it serves until the stop.
                await asyncio.Event().wait()
            except Exception as exc:
                self.failed("run", exc)
            if time.monotonic() - since >= RESTART_MAX_SECONDS:
                failures = 0
            failures += 1
            # Down: downlink for its devices waits in the store until it is back.
            self._transports.pop(self.name, None)
            await stop_within(transport, self._stop_seconds)
            transport = None
            await asyncio.sleep(_backoff(failures))

    def failed(self, phase: str, exc: BaseException) -> None:
        self.restarts += 1
        log.error(
            "transport.failed",
            transport=self.name,
            plugin=self.settings.plugin,
            phase=phase,
            error=repr(exc),
            exc_info=exc,
        )


def _backoff(failures: int) -> float:
    return min(RESTART_FIRST_SECONDS * 2.0 ** max(failures - 1, 0), RESTART_MAX_SECONDS)
