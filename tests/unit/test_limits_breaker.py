"""The circuit breaker's state machine, on an injected clock."""

from __future__ import annotations

import pytest

from proxy.redis.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(breaker: CircuitBreaker) -> BreakerState:
    """Read through a call: mypy must not narrow the attribute across the calls in between."""
    return breaker.state


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock) -> tuple[CircuitBreaker, list[tuple[BreakerState, BreakerState]]]:
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        3, 5.0, clock=clock, on_change=lambda old, new: changes.append((old, new))
    )
    return breaker, changes


def test_opens_after_consecutive_failures_only(clock: Clock) -> None:
    breaker, changes = make(clock)
    breaker.failed()
    breaker.failed()
    breaker.succeeded()  # a success resets the streak
    breaker.failed()
    breaker.failed()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.failed()
    assert state(breaker) is BreakerState.OPEN
    assert changes == [(BreakerState.CLOSED, BreakerState.OPEN)]
    assert not breaker.allow()
    assert breaker.retry_in() == 5.0


def test_half_open_lets_exactly_one_probe_through(clock: Clock) -> None:
    breaker, changes = make(clock)
    for _ in range(3):
        breaker.failed()
    clock.now += 4.999
    assert not breaker.allow()
    clock.now += 0.001
    assert breaker.allow()  # the probe
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()  # everyone else while the probe runs
    breaker.succeeded()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_failed_probe_reopens_for_a_full_period(clock: Clock) -> None:
    breaker, _ = make(clock)
    for _ in range(3):
        breaker.failed()
    clock.now += 5
    assert breaker.allow()
    breaker.failed()
    assert state(breaker) is BreakerState.OPEN
    assert breaker.retry_in() == 5.0
    assert not breaker.allow()


def test_abandoned_probe_does_not_wedge_half_open(clock: Clock) -> None:
    breaker, _ = make(clock)
    for _ in range(3):
        breaker.failed()
    clock.now += 5
    assert breaker.allow()
    breaker.abandoned()  # the probing request was cancelled
    assert state(breaker) is BreakerState.OPEN
    assert breaker.allow()  # the next call probes at once
    breaker.succeeded()
    assert state(breaker) is BreakerState.CLOSED


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError, match="open_seconds"):
        CircuitBreaker(1, 0.0)
