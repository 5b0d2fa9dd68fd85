"""When to try again: jittered exponential backoff, Retry-After, and a circuit breaker.

Pure logic with no I/O: the sender asks :class:`RetryPolicy` how long to hold a message
after a transient failure, :func:`is_permanent` whether to stop trying, and a
:class:`CircuitBreaker` whether to call the server at all.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Jittered exponential backoff: ``initial * multiplier**(attempt-1)``, capped at
    ``maximum``, each delay drawn within ``±jitter`` (a fraction) of that figure so that
    many senders failing together do not come back together."""

    initial: float = 1.0
    maximum: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(
        self,
        attempt: int,
        *,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """Seconds to wait before attempt number ``attempt + 1`` (``attempt`` >= 1 failures).

        A ``Retry-After`` from the server is a floor: never retry sooner than it says,
        even when it is longer than ``maximum``.
        """
        exponent = max(0, attempt - 1)
        try:
            base = min(self.maximum, self.initial * self.multiplier**exponent)
        except OverflowError:
            base = self.maximum
        low = base * (1.0 - self.jitter)
        # At the cap, jitter only downwards: clamping instead would pile every sender
        # onto exactly ``maximum``.
        high = min(base * (1.0 + self.jitter), self.maximum)
        draw = (rng or _rng).uniform(low, high) if high > low else base
        if retry_after is not None:
            draw = max(draw, retry_after)
        return draw


_rng = random.Random()  # noqa: S311 - backoff jitter, not cryptography


def is_permanent(status: int) -> bool:
    """Whether an HTTP status means retrying cannot help: a 4xx other than 408 and 429."""
    return 400 <= status < 500 and status not in (408, 429)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP-date), or ``None``.

    A malformed value is ``None`` (the caller falls back to its own backoff); a date in
    the past is ``0.0``.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # RFC 9110: an HTTP-date is always GMT
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


class BreakerState(StrEnum):
    """The three states of a :class:`CircuitBreaker`."""

    CLOSED = "closed"  # calls flow
    OPEN = "open"  # calls are held back until the reset timeout passes
    HALF_OPEN = "half_open"  # one probe call is out; its outcome decides


class CircuitBreaker:
    """Stops hammering a server that is down, and probes until it is back.

    Closed: every call is allowed; ``failure_threshold`` consecutive failures open it.
    Open: :meth:`allow` is False until ``reset_timeout`` passes, then the breaker goes
    half-open and allows exactly ONE probe. The probe's success closes it; its failure
    re-opens it with the timeout multiplied by ``multiplier`` (up to ``max_reset_timeout``).
    A probe that never reports back is replaced by another after one reset timeout.
    ``clock`` is injectable for tests (monotonic seconds).
    """

    def __init__(
        self,
        *,
        name: str = "northbound",
        failure_threshold: int = 5,
        reset_timeout: float = 5.0,
        max_reset_timeout: float = 300.0,
        multiplier: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.max_reset_timeout = max_reset_timeout
        self.multiplier = multiplier
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._timeout = reset_timeout
        self._opened_at = 0.0
        self._probe_at = 0.0
        self._hold_until = 0.0

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose timeout passed reads as open until
        :meth:`allow` lets the probe through)."""
        return self._state

    def allow(self) -> bool:
        """Whether a call may be made now. In half-open state, True once per probe."""
        now = self._clock()
        if now < self._hold_until:
            return False
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self._timeout:
                return False
            self._state = BreakerState.HALF_OPEN
            self._probe_at = now
            log.info("circuit.probe", breaker=self.name)
            return True
        # Half-open: the probe is out. Allow another only if it went silent.
        if now >= self._probe_at + self._timeout:
            self._probe_at = now
            return True
        return False

    def success(self) -> None:
        """A call succeeded: the server is up."""
        self._failures = 0
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            self._timeout = self.reset_timeout
            log.info("circuit.closed", breaker=self.name)

    def failure(self) -> None:
        """A call failed transiently (connection refused, timeout, 5xx, 429)."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(now)
        elif self._state is BreakerState.HALF_OPEN:
            self._timeout = min(self._timeout * self.multiplier, self.max_reset_timeout)
            self._open(now)
        # Open: a late failure of a call made before opening changes nothing.

    def next_probe_in(self) -> float:
        """Seconds until :meth:`allow` will let a call through (0 when it would now)."""
        now = self._clock()
        held = self._hold_until - now
        if self._state is BreakerState.OPEN:
            return max(0.0, held, self._opened_at + self._timeout - now)
        if self._state is BreakerState.HALF_OPEN:
            return max(0.0, held, self._probe_at + self._timeout - now)
        return max(0.0, held)

    def hold(self, seconds: float) -> None:
        """The server said when to come back (``Retry-After``): allow no call before then.

        Retry-After speaks for the server, not for the one message that received it:
        without a hold, every other device's message would still be tried at once, each
        earning its own 503, while the breaker counts up to its threshold.
        """
        self._hold_until = max(self._hold_until, self._clock() + seconds)

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        log.warning(
            "circuit.opened",
            breaker=self.name,
            failures=self._failures,
            reset_timeout=self._timeout,
        )
