"""Process metrics: a small registry and its Prometheus text exposition endpoint.

No client library: counters and gauges with labels are a few dozen lines, and the text
format (version 0.0.4) is stable and simple. One registry per process (:data:`REGISTRY`),
as Prometheus expects one target per process.

Message counters are fed by :func:`count_events`, a structlog processor that counts the
stable ``message.*`` / ``report.*`` events (docs/logging.md). That keeps the hot path
untouched (relay, senders and worker have no metrics calls) and makes the counters
agree with the logs by construction: the event names are already a contract that
monitoring may rely on. Gauges that are cheap to compute but expensive to keep current
(the store backlog, days left on a certificate) are sampled by collectors on scrape.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

if TYPE_CHECKING:
    # aiohttp loads only when the endpoint starts: log.py imports this module, and
    # every CLI command imports log.py.
    from aiohttp import web

    from gatewayd.listener import ListenerLimits

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]
Collector = Callable[[], Awaitable[None]]


class _Metric:
    """A named family of samples keyed by label values."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        self._values: dict[LabelValues, float] = {}

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def value(self, **labels: str) -> float:
        """The current value for ``labels`` (0 when never set), for tests and collectors."""
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[tuple[LabelValues, float]]:
        yield from sorted(self._values.items())

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for values, number in self.samples():
            pairs = ",".join(
                f'{n}="{_escape_label(v)}"' for n, v in zip(self.labelnames, values, strict=True)
            )
            series = f"{self.name}{{{pairs}}}" if pairs else self.name
            lines.append(f"{series} {_number(number)}")
        return "\n".join(lines) + "\n"


_M = TypeVar("_M", bound=_Metric)


class Counter(_Metric):
    """Only goes up; Prometheus computes rates from it."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    """A value that is set, not accumulated."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def remove(self, **labels: str) -> None:
        self._values.pop(self._key(labels), None)

    def clear(self) -> None:
        self._values.clear()


class Registry:
    """Metrics by name, plus collectors that refresh gauges just before a scrape."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: dict[str, Collector] = {}

    def counter(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> Counter:
        return self._get(Counter, name, help_text, labelnames)

    def gauge(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        return self._get(Gauge, name, help_text, labelnames)

    def _get(self, cls: type[_M], name: str, help_text: str, labelnames: tuple[str, ...]) -> _M:
        # Idempotent, so a second in-process Gateway (tests) gets the same families.
        existing = self._metrics.get(name)
        if existing is None:
            existing = self._metrics[name] = cls(name, help_text, labelnames)
        if not isinstance(existing, cls) or existing.labelnames != labelnames:
            raise ValueError(f"metric {name} is already registered differently")
        return existing

    def add_collector(self, name: str, collector: Collector) -> Callable[[], None]:
        """Run ``collector`` before every scrape; returns a function that removes it."""
        self._collectors[name] = collector

        def remove() -> None:
            self._collectors.pop(name, None)

        return remove

    async def render(self) -> str:
        """The exposition text; a failing collector is logged and its gauges left as they were."""
        for name, collector in list(self._collectors.items()):
            try:
                await collector()
            except Exception as exc:
                log.warning("metrics.collector_failed", collector=name, error=repr(exc))
        return "".join(m.render() for _, m in sorted(self._metrics.items()))


REGISTRY = Registry()

MESSAGES = REGISTRY.counter(
    "gatewayd_messages_total",
    "Messages by direction (uplink, downlink) and outcome (received, duplicate, forwarded, "
    "rejected, delivered, deferred, failed, expired), counted from the stable log events.",
    ("direction", "outcome"),
)
REPORTS = REGISTRY.counter(
    "gatewayd_reports_total",
    "Delivery reports by outcome (queued, sent, rejected, received, delivered, not_carried).",
    ("outcome",),
)
CREDENTIAL_RELOADS = REGISTRY.counter(
    "gatewayd_credential_reloads_total",
    "Credential reloads (SIGHUP or a file change) by outcome (ok, failed).",
    ("outcome",),
)
CREDENTIAL_NOT_AFTER = REGISTRY.gauge(
    "gatewayd_credential_not_after_seconds",
    "When the TLS certificate of a credentials instance expires (unix time).",
    ("credentials",),
)
CREDENTIAL_DAYS_LEFT = REGISTRY.gauge(
    "gatewayd_credential_days_left",
    "Days until the TLS certificate of a credentials instance expires (negative: expired).",
    ("credentials",),
)
STORE_BACKLOG = REGISTRY.gauge(
    "gatewayd_store_backlog",
    "Pending items per store queue (uplink, downlink, report), sampled on scrape.",
    ("queue",),
)
STORE_DEAD = REGISTRY.gauge(
    "gatewayd_store_dead",
    "Items in the dead-letter queue per store queue, sampled on scrape.",
    ("queue",),
)

# Stable event name -> (counter, labels). The direction of message.received and
# message.expired comes from the event itself (its field, or the bound queue).
_MESSAGE_EVENTS: dict[str, tuple[str | None, str]] = {
    "message.received": (None, "received"),
    "message.forwarded": ("uplink", "forwarded"),
    "message.rejected": ("uplink", "rejected"),
    "message.delivered": ("downlink", "delivered"),
    "message.delivery_deferred": ("downlink", "deferred"),
    "message.delivery_failed": ("downlink", "failed"),
    "message.expired": (None, "expired"),
}
_REPORT_EVENTS = {
    "report.queued": "queued",
    "report.sent": "sent",
    "report.rejected": "rejected",
    "report.received": "received",
    "report.delivered": "delivered",
    "report.not_carried": "not_carried",
}


def count_events(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: count the message and report events, pass the event on.

    It runs before level filtering, so the counts hold at any log level. It must come
    after ``merge_contextvars`` (``message.expired`` takes its queue from the context).
    """
    name = event.get("event")
    found = _MESSAGE_EVENTS.get(name) if isinstance(name, str) else None
    if found is not None:
        direction, outcome = found
        if direction is None:
            direction = str(event.get("direction") or event.get("queue") or "unknown")
        if outcome == "received" and event.get("duplicate"):
            outcome = "duplicate"
        MESSAGES.inc(direction=direction, outcome=outcome)
    elif isinstance(name, str) and name in _REPORT_EVENTS:
        REPORTS.inc(outcome=_REPORT_EVENTS[name])
    return event


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Where the exposition listener ended up (port 0 in the config picks a free one)."""

    host: str
    port: int


class MetricsServer:
    """``GET /metrics`` over plain HTTP on the configured (by default loopback) address."""

    def __init__(self, registry: Registry = REGISTRY) -> None:
        self._registry = registry
        self._runner: web.AppRunner | None = None
        # Scrapes are serialised: collectors touch shared gauges and the store.
        self._lock = asyncio.Lock()

    async def start(self, host: str, port: int, limits: ListenerLimits | None = None) -> Endpoint:
        from aiohttp import web

        from gatewayd.listener import GuardedSite, ListenerLimits, runner

        limits = limits or ListenerLimits(max_connections=64)
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        self._runner = runner(app, limits, access_log=None)
        await self._runner.setup()
        # Idle and slow-header scrapers are cut like on every listener (gatewayd.listener).
        await GuardedSite(self._runner, host, port, limits=limits, label="metrics").start()
        bound = self._runner.addresses[0]
        return Endpoint(host=str(bound[0]), port=int(bound[1]))

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _scrape(self, _request: web.Request) -> web.Response:
        from aiohttp import web

        async with self._lock:
            text = await self._registry.render()
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


def parse(text: str) -> dict[str, dict[LabelValues, float]]:
    """Parse exposition text back into ``{name: {label values: value}}`` (tests, tools).

    Label values come back in the order they appear; enough for our own output.
    """
    out: dict[str, dict[LabelValues, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, number = line.rpartition(" ")
        name, _, labels = head.partition("{")
        values: list[str] = []
        for pair in _split_labels(labels.removesuffix("}")):
            _, _, raw = pair.partition("=")
            values.append(_unescape_label(raw[1:-1]))
        out.setdefault(name, {})[tuple(values)] = float(number)
    return out


def _split_labels(text: str) -> Iterator[str]:
    # Commas inside quoted (escaped) values must not split a pair.
    start, quoted, escaped = 0, False, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            yield text[start:i]
            start = i + 1
    if text[start:]:
        yield text[start:]


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _unescape_label(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")
