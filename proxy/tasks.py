"""Long-lived tasks that outlive the failure of anything they call.

A relay's per-instance link, a watcher, a sweeper: each runs for as long as the process (or
its socket) does, and each calls things that fail (Redis, ComfyUI, a bug). A task that dies of
such a failure takes its job with it, silently: asyncio only mentions an unretrieved exception
when the task is garbage-collected, if ever. So:

* :func:`supervise` runs ``work`` again when it raises, after a delay that doubles while it
  keeps failing (from ``first_delay`` up to ``max_delay``) and starts over once a run lasted
  ``stable_seconds``. ``work`` returning ends supervision (a task that is done is done);
  cancellation ends it too (that is how its owner stops it).
* :func:`spawn` starts that in a named task; :class:`Supervised` is the start/stop handle the
  app's background services keep.
* :func:`task_failed` is the one way a failure is reported: a log line with the traceback and
  ``comfygate_task_failures_total{task}``. :class:`~proxy.periodic.Periodic` reports its failed
  rounds through it, and the WebSocket relay the frames it could not handle.

The delay between restarts is a back-off, not a synchronisation: ``wake()`` cuts it short
(the fan-in does when the pool says an instance is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import Counter

log = structlog.get_logger("comfygate.tasks")

FIRST_DELAY_SECONDS = 0.25
MAX_DELAY_SECONDS = 30.0
STABLE_SECONDS = 60.0
"""A run that lasted this long before failing restarts after the first delay again."""


def task_failed(
    task: str,
    failures: Counter | None,
    *,
    logger: Any = None,
    event: str = "task_failed",
    **fields: Any,
) -> None:
    """Report the exception being handled in ``task``: logged with its traceback and counted
    in ``failures`` (``comfygate_task_failures_total``; None: logged only). Call it from an
    ``except`` block."""
    (logger or log).exception(event, task=task, **fields)
    if failures is not None:
        failures.labels(task).inc()


class Wake:
    """A back-off that ``set()`` cuts short (e.g. the pool says the instance is back).

    A ``set()`` while no back-off runs is kept for the next one, which then returns at once:
    news that came while a reconnection attempt was under way is not lost (at worst one retry
    comes early)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or until :meth:`set` is (or was, since the last pause) called."""
        with contextlib.suppress(TimeoutError):
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that comes as
            # the event is set (the supervised task would then never stop).
            async with asyncio.timeout(seconds):
                await self._event.wait()
        self._event.clear()


async def supervise(
    work: Callable[[], Awaitable[object]],
    *,
    name: str,
    failures: Counter | None,
    logger: Any = None,
    first_delay: float = FIRST_DELAY_SECONDS,
    max_delay: float = MAX_DELAY_SECONDS,
    stable_seconds: float = STABLE_SECONDS,
    wake: Wake | None = None,
) -> None:
    """Run ``work()`` until it returns, restarting it with back-off whenever it raises (see
    the module doc). ``CancelledError`` is never caught."""
    waker = wake or Wake()
    delay = first_delay
    restarts = 0
    while True:
        started = time.monotonic()
        try:
            await work()
        except Exception:  # noqa: BLE001 - whatever it was, logged and counted; the job goes on
            if time.monotonic() - started >= stable_seconds:
                delay = first_delay
            task_failed(
                name,
                failures,
                logger=logger,
                event="task_restarting",
                restart_in_seconds=round(delay, 3),
                restarts=restarts,
            )
        else:
            return
        await waker.pause(delay)
        delay = min(delay * 2, max_delay)
        restarts += 1


class Supervised:
    """A supervised task's handle: ``start()``, ``stop()``, ``wake()``."""

    def __init__(
        self,
        work: Callable[[], Awaitable[object]],
        *,
        name: str,
        failures: Counter | None,
        logger: Any = None,
        first_delay: float = FIRST_DELAY_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        stable_seconds: float = STABLE_SECONDS,
        wake: Wake | None = None,
    ) -> None:
        self._work = work
        self.name = name
        self._failures = failures
        self._logger = logger
        self._delays = (first_delay, max_delay, stable_seconds)
        self._wake = wake or Wake()
        self.task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        """Start (a second call while it runs does nothing)."""
        if self.running:
            return
        first, cap, stable = self._delays
        self.task = asyncio.get_running_loop().create_task(
            supervise(
                self._work,
                name=self.name,
                failures=self._failures,
                logger=self._logger,
                first_delay=first,
                max_delay=cap,
                stable_seconds=stable,
                wake=self._wake,
            ),
            name=f"comfygate-{self.name}",
        )

    def wake(self) -> None:
        """Restart now if it is waiting out a back-off."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancel it and wait until it has stopped."""
        task, self.task = self.task, None
        if task is not None:
            await cancel_and_wait(task)


CANCEL_AGAIN_SECONDS = 1.0
"""How long :func:`cancel_and_wait` lets a cancelled task end before cancelling it again."""


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again while it runs on.

    Once is not always enough: a cancellation that lands inside a library call can be
    swallowed (on Python 3.11 ``asyncio.wait_for`` returns the result of an operation that
    completed as it was cancelled), and the task then runs on, "cancelling" but never
    cancelled; a shutdown waiting for it waited forever. A later cancellation lands at
    another ``await`` and ends it."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_SECONDS)
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("task_stopped_on_error", task=task.get_name(), error=type(error).__name__)


def spawn(
    work: Callable[[], Awaitable[object]], *, name: str, failures: Counter | None
) -> Supervised:
    """A started :class:`Supervised` with the default back-off."""
    handle = Supervised(work, name=name, failures=failures)
    handle.start()
    return handle


__all__ = ["Supervised", "Wake", "cancel_and_wait", "spawn", "supervise", "task_failed"]
