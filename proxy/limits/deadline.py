"""A deadline for Redis round trips that blames Redis, not the proxy's own busy event loop.

``asyncio.timeout`` measures event-loop time. When the proxy is saturated (say 64 concurrent
``POST /prompt`` bodies being parsed), one loop iteration can take longer than the whole budget:
Redis answered in 200 us, but the reply sits unread in the socket while other requests run,
and the timer fires first. With ``submit`` failing closed, that false timeout would open the
circuit breaker and refuse every submission for ``breaker_open_seconds`` - exactly under load.

:class:`Deadline` is ``asyncio.timeout_at`` with one difference: when its timer fires late
(the loop was busy past the deadline), it looks again a few milliseconds later, once the loop
has caught up and read what arrived, up to a hard ``limit``. On an idle loop a silent Redis
still times out on time, and a busy one is bounded by the limit.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Final

LAG_TOLERANCE: Final = 0.005
"""A timer firing this much after its time means the loop was busy, not idle."""
RECHECK_SECONDS: Final = 0.005
MAX_LAG_GRACE: Final = 1.0
"""The most a busy loop can stretch a deadline (a hung Redis under load still fails)."""


class Deadline:
    """``async with Deadline(when):`` raises ``TimeoutError`` after loop time ``when``, unless
    the loop itself was late (then it re-checks, until ``when + MAX_LAG_GRACE``)."""

    __slots__ = ("_cancelling", "_handle", "_limit", "_loop", "_task", "_when", "expired")

    def __init__(self, when: float) -> None:
        self._when = when
        self._limit = when + MAX_LAG_GRACE
        self.expired = False

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always inside a task
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_at(self._when, self._fire)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        if (
            self.expired
            and exc_type is asyncio.CancelledError
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc

    def _fire(self) -> None:
        now = self._loop.time()
        if now - self._when > LAG_TOLERANCE and now < self._limit:
            # Late: the loop was running other work past the deadline, and the reply may be
            # waiting unread. Look again after the loop has had a turn at its sockets.
            self._when = min(now + RECHECK_SECONDS, self._limit)
            self._handle = self._loop.call_at(self._when, self._fire)
            return
        self.expired = True
        self._task.cancel()


__all__ = ["LAG_TOLERANCE", "MAX_LAG_GRACE", "Deadline"]
