"""Backoff, Retry-After and the circuit breaker, with seeded randomness and a fake clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from gatewayd.retry import (
    BreakerState,
    CircuitBreaker,
    RetryPolicy,
    is_permanent,
    parse_retry_after,
)


def test_delay_grows_exponentially_within_jitter_bounds() -> None:
    policy = RetryPolicy(initial=1.0, maximum=300.0, multiplier=2.0, jitter=0.2)
    rng = random.Random(1)
    for attempt in range(1, 9):
        base = 2.0 ** (attempt - 1)
        draws = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert min(draws) >= base * 0.8
        assert max(draws) <= base * 1.2
        assert max(draws) - min(draws) > base * 0.2  # it is really jittered


def test_delay_is_capped_and_still_jittered_at_the_cap() -> None:
    policy = RetryPolicy(initial=1.0, maximum=30.0, jitter=0.2)
    rng = random.Random(2)
    draws = [policy.delay(attempt, rng=rng) for attempt in (20, 100, 10_000) for _ in range(100)]
    assert all(24.0 <= d <= 30.0 for d in draws)
    # Not everyone lands on exactly the cap.
    assert sum(d == 30.0 for d in draws) == 0
    assert RetryPolicy(jitter=0.0).delay(3) == 4.0


def test_same_seed_same_delays() -> None:
    policy = RetryPolicy()
    first = [policy.delay(n, rng=random.Random(7)) for n in range(1, 6)]
    again = [policy.delay(n, rng=random.Random(7)) for n in range(1, 6)]
    assert first == again


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(initial=1.0, maximum=60.0)
    rng = random.Random(3)
    assert policy.delay(1, retry_after=10.0, rng=rng) == 10.0
    assert policy.delay(1, retry_after=600.0, rng=rng) == 600.0  # even beyond the maximum
    assert 0.8 <= policy.delay(1, retry_after=0.0, rng=rng) <= 1.2  # no sooner than backoff


@pytest.mark.parametrize(
    ("status", "permanent"),
    [
        *[(400, True), (401, True), (403, True), (404, True), (413, True), (415, True)],
        *[(408, False), (429, False), (500, False), (503, False), (200, False), (302, False)],
    ],
)
def test_is_permanent(status: int, permanent: bool) -> None:
    assert is_permanent(status) is permanent


def test_parse_retry_after_seconds_and_http_date() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after("Sat, 01 Mar 2025 12:01:30 GMT", now=now) == 90.0
    past = (now - timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(past, now=now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(bad, now=now) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=10.0, clock=clock)
    with structlog.testing.capture_logs() as logs:
        breaker.failure()
        breaker.failure()
        breaker.success()  # resets the count: failures must be consecutive
        for _ in range(3):
            assert breaker.allow()
            breaker.failure()
        assert breaker.state is BreakerState.OPEN
        assert not breaker.allow()
        assert breaker.next_probe_in() == 10.0

        clock.now += 9.9
        assert not breaker.allow()
        clock.now += 0.1
        assert breaker.allow()  # the one probe
        assert breaker.state is BreakerState.HALF_OPEN
        assert not breaker.allow()  # and only one
        breaker.success()
        assert breaker.state is BreakerState.CLOSED
        assert breaker.allow()
    assert [e["event"] for e in logs if e["event"].startswith("circuit.")] == [
        "circuit.opened",
        "circuit.probe",
        "circuit.closed",
    ]


def test_failed_probe_reopens_with_growing_timeout() -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        failure_threshold=1, reset_timeout=5.0, max_reset_timeout=15.0, clock=clock
    )
    breaker.failure()
    timeouts = []
    for _ in range(4):
        clock.now += breaker.next_probe_in()
        assert breaker.allow()
        breaker.failure()
        assert breaker.state is BreakerState.OPEN
        timeouts.append(breaker.next_probe_in())
    assert timeouts == [10.0, 15.0, 15.0, 15.0]
    clock.now += 15.0
    assert breaker.allow()
    breaker.success()
    # Closed again: the timeout starts from the beginning next time.
    breaker.failure()
    assert breaker.next_probe_in() == 5.0


def test_silent_probe_is_replaced_and_late_failures_are_ignored() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=5.0, clock=clock)
    breaker.failure()
    breaker.failure()
    breaker.failure()  # a call that was in flight when it opened: no effect
    assert breaker.next_probe_in() == 5.0
    clock.now += 5.0
    assert breaker.allow()
    clock.now += 4.0
    assert not breaker.allow()
    assert breaker.next_probe_in() == 1.0
    clock.now += 1.0
    assert breaker.allow()  # the first probe never reported: another may go
