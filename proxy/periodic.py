"""``Periodic``: run a coroutine every N seconds in the background until stopped.

The proxy's background loops (health checks, DNS discovery, capability refresh, the upstream
probe, the queue-quota reconciler) share the same shape: a named task, a period, and a round
whose failure is logged, counted (``comfygate_task_failures_total{task}``, through
:func:`proxy.tasks.task_failed`) and never ends the loop (the next round tries again). Stopping
cancels the task and waits for it, so nothing runs after ``stop()`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from proxy.tasks import cancel_and_wait, task_failed

if TYPE_CHECKING:
    from prometheus_client import Counter


class Periodic:
    """Runs ``work`` every ``interval`` seconds (see the module docstring).

    By default each round waits ``interval`` after the previous one ended. With ``fixed_rate``
    the rounds start ``interval`` apart (a slow round does not shift the following ones; the
    ones it overran follow at once). ``jitter`` (0..1)
    spreads each period by up to that fraction, so that processes started together do not all
    ask in lockstep. ``immediately`` runs the first round on start instead of one period later.
    """

    def __init__(
        self,
        work: Callable[[], Awaitable[object]],
        interval: float,
        *,
        name: str,
        log: Any,
        event: str,
        jitter: float = 0.0,
        immediately: bool = False,
        fixed_rate: bool = False,
        failures: Counter | None = None,
    ) -> None:
        """``log.exception(event)`` records a failed round (``log``: a structlog logger), and
        ``failures`` (``Metrics.task_failures``) counts it, labelled with ``name``."""
        self._work = work
        self.interval = interval
        self._name = name
        self._log = log
        self._event = event
        self._jitter = jitter
        self._immediately = immediately
        self._fixed_rate = fixed_rate
        self._failures = failures
        self.task_label = name.removeprefix("comfygate-")
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the loop (a second call while it runs does nothing)."""
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Cancel the loop and wait until it has stopped.

        A flag as well as the cancellation: a cancellation that lands inside a round can be
        swallowed by a client library (on Python 3.11 ``asyncio.wait_for`` returns the
        result of an operation that completed as it was cancelled); the task then stays
        "cancelling" and runs on, and a shutdown waited forever. The loop ends at the flag."""
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            await cancel_and_wait(task)

    def _period(self) -> float:
        if not self._jitter:
            return self.interval
        # A spread, not a secret: the standard generator is right here.
        return self.interval * random.uniform(1 - self._jitter, 1 + self._jitter)  # noqa: S311

    async def _loop(self) -> None:
        next_at = time.monotonic() + (0.0 if self._immediately else self._period())
        while not self._stop.is_set():
            # A period, not a synchronisation: nothing waits for a round to happen (the wait
            # ends early only when the loop is stopped).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await self._work()
            except Exception:  # noqa: BLE001 - logged; a bug in one round must not end the loop
                task_failed(self.task_label, self._failures, logger=self._log, event=self._event)
            if self._fixed_rate:
                next_at += self._period()
            else:
                next_at = time.monotonic() + self._period()


__all__ = ["Periodic"]
