"""The live state of a running gateway: readiness, the status view, the stats log line.

:class:`LiveState` answers ``/readyz`` and ``/status`` on the admin listener and writes
the periodic ``gateway.stats`` line; all three show the same figures. The ``gatewayd
status`` command (:func:`fetch`, :func:`render`) reads ``/status`` from a running
gateway and prints it as a table or as JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from gatewayd import __version__, metrics
from gatewayd.retry import BreakerState, CircuitBreaker

if TYPE_CHECKING:
    from gatewayd.daemon import Gateway
    from gatewayd.worker import QueueWorker

log = structlog.get_logger(__name__)

RATE_WINDOW = 60.0  # seconds the rates in the status view cover
RATE_SAMPLE = 5.0
# (direction, outcome) pairs whose per-second rate the status view shows.
RATES = (
    ("uplink", "received"),
    ("uplink", "forwarded"),
    ("downlink", "received"),
    ("downlink", "delivered"),
)


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class RateWindow:
    """Counter totals sampled every few seconds; rates over the last minute from them."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        totals = {
            f"{d}_{o}": metrics.total("gatewayd_messages_total", direction=d, outcome=o)
            for d, o in RATES
        }
        self._samples.append((now, totals))
        while len(self._samples) > 1 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()

    def rates(self) -> dict[str, float]:
        """Per second, over the window so far (zero until two samples exist)."""
        if len(self._samples) < 2:
            return {f"{d}_{o}": 0.0 for d, o in RATES}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, 1e-9)
        return {k: round((last[k] - first[k]) / span, 3) for k in last}


class LiveState:
    """Readiness and the status view, read from the parts of one :class:`Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self.breaker: CircuitBreaker | None = None
        self.workers: dict[str, QueueWorker] = {}
        self.store_writable = False
        self.rates = RateWindow()
        self._started = time.time()

    def not_ready(self) -> list[str]:
        gw = self._gw
        reasons = []
        if gw.runs_northbound:  # the devices part of two has neither
            if gw.api_port is None:
                reasons.append("the API is not listening yet")
            registrar = gw.registrar
            if registrar is None or not registrar.ready.is_set():
                reasons.append(f"not registered with {gw.settings.northbound.api_root}")
        store = gw.store_if_open
        refusing = store.refusing if store is not None else None
        if not self.store_writable:
            reasons.append("the store has not taken a write yet")
        elif refusing is not None:
            reasons.append(f"the store refuses writes ({refusing})")
        if self.breaker is not None and self.breaker.state == BreakerState.OPEN:
            reasons.append("the circuit to the MSGin5G Server is open (server unreachable)")
        return reasons

    def set_gauges(self) -> None:
        registrar = self._gw.registrar
        expires = registrar.expires if registrar is not None else None
        metrics.REGISTERED.set(1 if expires is not None else 0)
        metrics.REGISTRATION_EXPIRY.set(expires or 0)
        metrics.READY.set(0 if self.not_ready() else 1)
        if self.breaker is not None:
            metrics.set_breaker(self.breaker.name, str(self.breaker.state))
        for queue, worker in self.workers.items():
            metrics.IN_FLIGHT.labels(queue=_store_queue(queue)).set(worker.in_flight)

    async def status(self) -> dict[str, Any]:
        gw = self._gw
        self.set_gauges()
        gw.credentials.set_expiry_gauges()  # days left as of now
        registrar = gw.registrar
        expires = registrar.expires if registrar is not None else None
        refused = registrar.refused if registrar is not None else None
        queues: dict[str, Any] = {}
        store = gw.store_if_open
        if store is not None:
            stats = await store.stats()  # one scan, shared with the store gauges
            metrics.set_store(stats)
            for name, counts in stats["queues"].items():
                worker = next((w for q, w in self.workers.items() if _store_queue(q) == name), None)
                age = counts["oldest_age"]
                queues[name] = {
                    "pending": counts["pending"],
                    "dead": counts["dead"],
                    "oldest_age_seconds": None if age is None else round(age, 1),
                    "in_flight": worker.in_flight if worker is not None else 0,
                }
        credentials = {
            labels[0]: round(value, 1)
            for labels, value in _samples("gatewayd_credential_days_left").items()
        }
        reasons = self.not_ready()
        return {
            "gateway": {
                "id": gw.settings.gateway_id,
                "type": str(gw.settings.gateway_type),
                "version": __version__,
                "started": iso(self._started),
                "uptime_seconds": round(time.time() - self._started, 1),
                "ready": not reasons,
                "not_ready": reasons,
            },
            "registration": {
                "server": gw.settings.northbound.api_root,
                "state": "refused"
                if refused is not None
                else ("registered" if expires is not None else "unregistered"),
                "expires": iso(expires),
            },
            "circuit": str(self.breaker.state) if self.breaker is not None else None,
            "transports": {
                name: {"plugin": transport.settings.plugin, **transport.link_state()}
                for name, transport in sorted(gw.transports.items())
            },
            "queues": queues,
            "rates_per_second": self.rates.rates(),
            "credentials_days_left": credentials,
        }

    async def stats_loop(self, interval: float) -> None:
        """Sample the rates; every ``interval`` seconds (0: never) log ``gateway.stats``."""
        last = time.monotonic()
        while True:
            self.rates.sample()
            await asyncio.sleep(min(RATE_SAMPLE, interval) if interval else RATE_SAMPLE)
            if interval and time.monotonic() - last >= interval - 0.01:
                last = time.monotonic()
                log.info("gateway.stats", **flatten(await self.status()))


def _store_queue(worker_name: str) -> str:
    return "report" if worker_name == "reports" else worker_name


def _samples(name: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sample.labels.values())] = sample.value
    return out


def flatten(view: dict[str, Any]) -> dict[str, Any]:
    """The status view as flat log fields (``queues.uplink.pending`` -> ``uplink_pending``)."""
    out: dict[str, Any] = {
        "ready": view["gateway"]["ready"],
        "registration": view["registration"]["state"],
        "circuit": view["circuit"],
    }
    for queue, counts in view["queues"].items():
        for key in ("pending", "dead", "oldest_age_seconds", "in_flight"):
            out[f"{queue}_{key}"] = counts[key]
    for key, rate in view["rates_per_second"].items():
        out[f"rate_{key}"] = rate
    for name, state in view["transports"].items():
        out[f"transport_{name}"] = state.get("state")
    return out


# --- the ``gatewayd status`` command ---------------------------------------------------------


async def fetch(url: str, timeout: float = 5.0) -> dict[str, Any]:
    import aiohttp

    from gatewayd.errors import PeerUnavailableError

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"{url}/status") as resp,
        ):
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PeerUnavailableError(f"no gateway answers at {url}/status: {exc}") from None


def render(view: dict[str, Any]) -> str:
    """The status view as a compact table, read in one glance."""
    gw, reg = view["gateway"], view["registration"]
    ready = "READY" if gw["ready"] else "NOT READY: " + "; ".join(gw["not_ready"])
    lines = [
        f"gatewayd {gw['version']}  {gw['id']} ({gw['type']})  up {_age(gw['uptime_seconds'])}",
        f"state        {ready}",
        f"registration {reg['state']} at {reg['server']}"
        + (f", expires {reg['expires']}" if reg["expires"] else ""),
        f"circuit      {view['circuit']}",
        "",
        f"{'TRANSPORT':<14}{'PLUGIN':<10}LINK",
    ]
    for name, state in view["transports"].items():
        extra = ", ".join(f"{k}={v}" for k, v in state.items() if k not in ("plugin", "state"))
        lines.append(f"{name:<14}{state['plugin']:<10}{state.get('state', '?')} {extra}".rstrip())
    lines += ["", f"{'QUEUE':<10}{'PENDING':>8}{'IN FLIGHT':>10}{'DEAD':>7}  OLDEST"]
    for name, q in view["queues"].items():
        oldest = _age(q["oldest_age_seconds"]) if q["oldest_age_seconds"] is not None else "-"
        lines.append(f"{name:<10}{q['pending']:>8}{q['in_flight']:>10}{q['dead']:>7}  {oldest}")
    rates = view["rates_per_second"]
    lines += ["", "last minute  " + "  ".join(f"{k} {v}/s" for k, v in rates.items())]
    for name, days in view["credentials_days_left"].items():
        lines.append(f"credentials  {name}: {days} days left")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"
