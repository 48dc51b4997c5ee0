"""A circuit breaker in front of Redis, so a dead Redis costs microseconds, not timeouts.

::

    closed --(``failures`` consecutive failures)--> open
    open --(``open_seconds`` later, the next call)--> half-open: that one call probes Redis
    half-open --probe succeeds--> closed        half-open --probe fails--> open (timer restarts)

While open (and while a probe is in flight) :meth:`CircuitBreaker.allow` answers False without
touching Redis; the caller applies its fail mode. State changes are reported to ``on_change``
(one log line and the state gauge), never each refused call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum


class BreakerState(IntEnum):
    """A breaker's state: this one's and each upstream instance's
    (``proxy.upstream.health_checks.Breaker``); the values of the
    ``comfygate_redis_breaker_state`` and ``comfygate_upstream_state`` gauges."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Counts consecutive failures of one dependency; not thread-safe (one event loop)."""

    def __init__(
        self,
        failures: int,
        open_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failures < 1 or open_seconds <= 0:
            raise ValueError("failures must be >= 1 and open_seconds > 0")
        self.threshold = failures
        self.open_seconds = open_seconds
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._opened_at = 0.0

    def allow(self) -> bool:
        """Whether this call may use the dependency. In the open state, the first call after
        ``open_seconds`` becomes the probe (half-open); the others are refused until it ends."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self._clock() >= self._opened_at + self.open_seconds:
            self._set(BreakerState.HALF_OPEN)
            return True
        return False

    def succeeded(self) -> None:
        self.consecutive_failures = 0
        if self.state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def failed(self) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.consecutive_failures >= self.threshold
        ):
            self._opened_at = self._clock()
            self._set(BreakerState.OPEN)

    def abandoned(self) -> None:
        """The call ended without an answer either way (cancelled: the client went away). A
        probe must not leave the breaker half-open for ever: the next call probes again."""
        if self.state is BreakerState.HALF_OPEN:
            self._opened_at = self._clock() - self.open_seconds
            self._set(BreakerState.OPEN)

    def retry_in(self) -> float:
        """Seconds until the next probe may run (0 when closed or due)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(0.0, self._opened_at + self.open_seconds - self._clock())

    def _set(self, state: BreakerState) -> None:
        old, self.state = self.state, state
        if self._on_change is not None and old is not state:
            self._on_change(old, state)


__all__ = ["BreakerState", "CircuitBreaker"]
