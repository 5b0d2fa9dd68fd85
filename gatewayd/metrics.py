"""Process metrics on prometheus-client (served by :mod:`gatewayd.admin`).

Counters are incremented where a message is accepted (stored) and where it is settled
(the queue worker's outcome), never from log events: a log level filter must not change
a metric. Gauges that are cheap to compute but expensive to keep current (store backlog,
in-flight work, breaker and registration state, days left on a certificate) are sampled
by the gateway just before each scrape (:meth:`Sampler.refresh`).

One registry per process (:data:`REGISTRY`), as Prometheus expects one target per
process; it carries the standard process, platform and GC collectors as well.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gatewayd import __version__
from gatewayd.envelope import lane_service_id

if TYPE_CHECKING:
    from gatewayd.store import Item
    from gatewayd.worker import Outcome

log = structlog.get_logger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
LabelValues = tuple[str, ...]
Collector = Callable[[], Awaitable[None]]

# The *_created series double the exposition and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Settled outcomes per direction; with "received", "duplicate" and "expired" these are
# the label values of gatewayd_messages_total, all created at 0 for every transport.
UPLINK_OUTCOMES = ("received", "duplicate", "forwarded", "rejected", "deferred", "expired")
DOWNLINK_OUTCOMES = ("received", "duplicate", "delivered", "failed", "deferred", "expired")
REPORT_OUTCOMES = ("queued", "sent", "rejected", "received", "delivered", "not_carried")
QUEUES = ("uplink", "downlink", "report", "segment", "intake")
# Why intake refuses device input for good, as the core decides (transports add their own).
INTAKE_REASONS = ("invalid_message", "unknown_device", "device_refused")
BREAKER_STATES = ("closed", "open", "half_open")
# Seconds; from a LAN round trip to a message that waited out a server outage.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)

BUILD_INFO = Gauge(
    "gatewayd_build_info",
    "Always 1; the labels say which gatewayd and Python run.",
    ("version", "python"),
    registry=REGISTRY,
)
BUILD_INFO.labels(version=__version__, python=platform.python_version()).set(1)

MESSAGES = Counter(
    "gatewayd_messages",
    "Messages by direction (uplink, downlink), transport and outcome: received and "
    "duplicate when stored, forwarded/delivered, rejected/failed, deferred (a retry), "
    "expired when settled.",
    ("direction", "transport", "outcome"),
    registry=REGISTRY,
)
REPORTS = Counter(
    "gatewayd_reports",
    "Delivery reports by outcome (queued, sent, rejected, received, delivered, not_carried).",
    ("outcome",),
    registry=REGISTRY,
)
RELAY_SECONDS = Histogram(
    "gatewayd_relay_seconds",
    "End to end: from a message's acceptance (stored) to its successful hand-over "
    "(uplink: the server's answer; downlink: the transport's delivery).",
    ("direction", "transport"),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
NORTHBOUND_SECONDS = Histogram(
    "gatewayd_northbound_request_seconds",
    "Requests to the MSGin5G Server by operation, whatever their answer.",
    ("operation",),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "gatewayd_in_flight",
    "Items of each store queue being handled right now.",
    ("queue",),
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "gatewayd_circuit_state",
    "1 for the state the circuit breaker towards the server is in, 0 for the others.",
    ("breaker", "state"),
    registry=REGISTRY,
)
REGISTERED = Gauge(
    "gatewayd_registered",
    "1 while the server holds a registration of this gateway.",
    registry=REGISTRY,
)
REGISTRATION_EXPIRY = Gauge(
    "gatewayd_registration_expiry_seconds",
    "When the registration the server granted expires (unix time; 0: none).",
    registry=REGISTRY,
)
READY = Gauge(
    "gatewayd_ready",
    "1 when ready: credentials loaded, API listening, registered, store writable and the "
    "circuit to the server not open (as /readyz answers).",
    registry=REGISTRY,
)
CREDENTIAL_RELOADS = Counter(
    "gatewayd_credential_reloads",
    "Credential reloads (SIGHUP or a file change) by outcome (ok, failed).",
    ("outcome",),
    registry=REGISTRY,
)
CREDENTIAL_NOT_AFTER = Gauge(
    "gatewayd_credential_not_after_seconds",
    "When the TLS certificate of a credentials instance expires (unix time).",
    ("credentials",),
    registry=REGISTRY,
)
CREDENTIAL_DAYS_LEFT = Gauge(
    "gatewayd_credential_days_left",
    "Days until the TLS certificate of a credentials instance expires (negative: expired).",
    ("credentials",),
    registry=REGISTRY,
)
STORE_BACKLOG = Gauge(
    "gatewayd_store_backlog",
    "Pending items per store queue (uplink, downlink, report, segment), sampled on scrape.",
    ("queue",),
    registry=REGISTRY,
)
STORE_OLDEST_AGE = Gauge(
    "gatewayd_store_oldest_age_seconds",
    "Age of the oldest pending item per store queue (0 when empty), sampled on scrape.",
    ("queue",),
    registry=REGISTRY,
)
STORE_DEAD = Gauge(
    "gatewayd_store_dead",
    "Items in the dead-letter queue per store queue, sampled on scrape.",
    ("queue",),
    registry=REGISTRY,
)
STORE_TRANSACTIONS = Gauge(
    "gatewayd_store_transactions",
    "Store transactions (writer round trips) committed by this process since it started,"
    " sampled on scrape; its rate over the message rate is the cost of durability.",
    registry=REGISTRY,
)
INTAKE_REJECTED = Counter(
    "gatewayd_intake_rejected",
    "Device input refused for good at intake, by transport and reason (kept in the DLQ).",
    ("transport", "reason"),
    registry=REGISTRY,
)
PEER_DROPPED = Counter(
    "gatewayd_transport_peer_dropped",
    "Messages a transport's peer (an MQTT broker) reports it dropped, as far as it tells.",
    ("transport",),
    registry=REGISTRY,
)

for _outcome in ("ok", "failed"):
    CREDENTIAL_RELOADS.labels(outcome=_outcome)
for _outcome in REPORT_OUTCOMES:
    REPORTS.labels(outcome=_outcome)
# The requests the gateway makes, as northbound_request() names them.
for _operation in (
    "POST /msgs-msgdelivery/v1/deliver-ue-message",
    "POST /msgs-msgdelivery/v1/deliver-report",
    "POST /msgs-gwregistration/v1/registrations",
    "PUT registration",
    "DELETE registration",
):
    NORTHBOUND_SECONDS.labels(operation=_operation)
for _queue in QUEUES:
    for _gauge in (IN_FLIGHT, STORE_BACKLOG, STORE_OLDEST_AGE, STORE_DEAD):
        _gauge.labels(queue=_queue)


def declare_transports(names: Iterable[str]) -> None:
    """Create every message series of these transports at 0, so that ``rate()`` and
    ``increase()`` see the first message and dashboards show the transport at once."""
    for name in names:
        for outcome in UPLINK_OUTCOMES:
            MESSAGES.labels(direction="uplink", transport=name, outcome=outcome)
        for outcome in DOWNLINK_OUTCOMES:
            MESSAGES.labels(direction="downlink", transport=name, outcome=outcome)
        for direction in ("uplink", "downlink"):
            RELAY_SECONDS.labels(direction=direction, transport=name)
        MESSAGES.labels(direction="segment", transport=name, outcome="expired")
        for reason in INTAKE_REASONS:
            INTAKE_REJECTED.labels(transport=name, reason=reason)
        PEER_DROPPED.labels(transport=name)


# Children by label values: labels() takes a lock and builds a key on every call, and
# these run once or twice per message.
_messages: dict[tuple[str, str, str], Counter] = {}
_relay: dict[tuple[str, str], Histogram] = {}


def _count(direction: str, transport: str, outcome: str) -> None:
    key = (direction, transport, outcome)
    child = _messages.get(key)
    if child is None:
        child = _messages[key] = MESSAGES.labels(*key)
    child.inc()


def accepted(direction: str, transport: str, *, duplicate: bool) -> None:
    """A message is durably stored (or recognised as a duplicate of a stored one)."""
    _count(direction, transport, "duplicate" if duplicate else "received")


def report(outcome: str) -> None:
    REPORTS.labels(outcome=outcome).inc()


# Which transport serves a UE Service ID; set by the gateway at start.
def _unknown(_service_id: str) -> str:
    return "unknown"


_transport_of: Callable[[str], str] = _unknown


def transport_of(service_id: str) -> str:
    return _transport_of(service_id)


def _lane_transport(lane: str) -> str:
    # A device's lane, sub-lane ("service id|n") or segment set ("service id|origin|segId").
    return _transport_of(lane_service_id(lane))


def use_transport_lookup(lookup: Callable[[str], str]) -> None:
    global _transport_of  # noqa: PLW0603 - one lookup per process, like the registry
    _transport_of = lookup


def settled(item: Item, outcome: Outcome) -> None:
    """The queue worker's verdict on one item, once it is recorded in the store."""
    # By class name: gatewayd.worker imports this module.
    verdict = type(outcome).__name__  # Done | Dead | Retry
    queue = item.queue.value
    if queue == "report":
        if verdict != "Retry":
            report("sent" if verdict == "Done" else "rejected")
        return
    if item.body.get("kind") == "report":
        return  # a report for a device: the dispatcher counts delivered / not_carried
    if _later_segment(item):
        return  # a segmented message counts once, by its first segment
    transport = _lane_transport(item.lane)
    if verdict == "Done":
        result = "forwarded" if queue == "uplink" else "delivered"
        key = (queue, transport)
        histogram = _relay.get(key)
        if histogram is None:
            histogram = _relay[key] = RELAY_SECONDS.labels(*key)
        histogram.observe(max(0.0, time.time() - item.created))
    elif verdict == "Dead":
        result = "rejected" if queue == "uplink" else "failed"
    else:
        result = "deferred"
    _count(queue, transport, result)


def expired(items: Sequence[Item]) -> None:
    """Count the messages one expiry sweep moved to the DLQ: a segmented message once,
    whichever of its segments were there (a set waiting for reassembly usually expires
    because one is missing, maybe the first)."""
    seen: set[tuple[str, str]] = set()
    for item in items:
        queue = item.queue.value
        if queue not in ("uplink", "downlink", "segment") or item.body.get("kind") == "report":
            continue
        seg_id = _segment_set(item)
        if seg_id is not None:
            if (queue, seg_id) in seen:
                continue
            seen.add((queue, seg_id))
        _count(queue, _lane_transport(item.lane), "expired")


def _later_segment(item: Item) -> bool:
    """Segment 2..n of a segmented message."""
    params = _seg_params(item)
    return params is not None and params.get("segNumb", 1) != 1


def _segment_set(item: Item) -> str | None:
    """The ``segId`` of the set ``item`` is a segment of, if it is one."""
    params = _seg_params(item)
    return None if params is None else str(params.get("segId"))


def _seg_params(item: Item) -> dict[str, Any] | None:
    # Uplink bodies are the wire message itself, downlink bodies wrap it in ``wire``.
    wire = item.body.get("wire", item.body)
    params = wire.get("segParams") if isinstance(wire, dict) else None
    return params if isinstance(params, dict) else None


def rejected(transport: str, reason: str) -> None:
    """Device input refused for good at intake (and kept in the DLQ queue ``intake``)."""
    INTAKE_REJECTED.labels(transport=transport, reason=reason).inc()


def peer_dropped(transport: str, count: int) -> None:
    PEER_DROPPED.labels(transport=transport).inc(count)


@contextmanager
def northbound_request(method: str, path: str) -> Iterator[None]:
    """Time one request to the server; registration URLs become one operation."""
    operation = f"{method} {path}" if path.startswith("/") else f"{method} registration"
    with NORTHBOUND_SECONDS.labels(operation=operation).time():
        yield


def set_breaker(name: str, state: str) -> None:
    for known in BREAKER_STATES:
        CIRCUIT_STATE.labels(breaker=name, state=known).set(1 if known == state else 0)


class Sampler:
    """Async refreshers of sampled gauges, run before a scrape (``/status`` refreshes
    the store and credential gauges it shows itself, from its own readings)."""

    def __init__(self) -> None:
        self._collectors: dict[str, Collector] = {}
        # Scrapes are serialised: collectors touch shared gauges and the store.
        self._lock = asyncio.Lock()

    def add(self, name: str, collector: Collector) -> Callable[[], None]:
        """Run ``collector`` before every scrape; returns a function that removes it."""
        self._collectors[name] = collector

        def remove() -> None:
            self._collectors.pop(name, None)

        return remove

    async def refresh(self) -> None:
        """A failing collector is logged and its gauges left as they were."""
        async with self._lock:
            for name, collector in list(self._collectors.items()):
                try:
                    await collector()
                except Exception as exc:
                    log.warning("metrics.collector_failed", collector=name, error=repr(exc))


SAMPLER = Sampler()


def set_store(stats: dict[str, Any]) -> None:
    """The store gauges from one :meth:`gatewayd.store.Store.stats` reading."""
    for queue, counts in stats["queues"].items():
        STORE_BACKLOG.labels(queue=queue).set(counts["pending"])
        STORE_DEAD.labels(queue=queue).set(counts["dead"])
        STORE_OLDEST_AGE.labels(queue=queue).set(counts["oldest_age"] or 0)
    STORE_TRANSACTIONS.set(stats["commits"])


async def render() -> bytes:
    """The exposition text, gauges refreshed."""
    await SAMPLER.refresh()
    return generate_latest(REGISTRY)


def parse(text: str) -> dict[str, dict[LabelValues, float]]:
    """Parse exposition text into ``{sample name: {label values: value}}`` (tests, tools).

    Label values come in the order of their names (``direction, outcome, transport``).
    """
    out: dict[str, dict[LabelValues, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values = tuple(v for _, v in sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[values] = sample.value
    return out


def value(name: str, **labels: str) -> float:
    """One sample of this process's registry (0 when absent), for the status view."""
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


def total(name: str, **match: str) -> float:
    """The sum of a counter's samples whose labels include ``match``."""
    out = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items()):
                out += sample.value
    return out
