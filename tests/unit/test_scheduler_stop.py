"""Stopping the gateway queue's feeder (and any supervised task) always ends it.

On Python 3.11, ``asyncio.wait_for`` returns normally when the task is cancelled just after
the awaited future completed (CPython gh-86296). The feeder waited for its wake-ups that way,
and redis-py writes every command through ``wait_for(writer.drain(), ...)``: with wake-ups
from other replicas arriving at any moment, a stop's cancel was swallowed in about one run in
three of the two-replica test, the feeder ran on and ``Gate.stop()`` never returned.

Two fixes, each tested here: the proxy's own waits deliver the cancel
(``proxy.tasks.wait_event``; the wake-up is placed just before the cancel, at each of the
first few loop passes, so the window is hit whatever the exact number of passes), and a stop
delivers the cancel again while the task runs on (``proxy.tasks.cancel_and_wait``; a store
and a task that swallow one cancel, as a library's ``wait_for`` does). Every stop is bounded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.scheduler.gate import Gate
from proxy.scheduler.metrics import SchedulerMetrics
from proxy.scheduler.store import MemoryStore, View
from proxy.settings import UpstreamSettings
from proxy.settings.scheduler import SchedulerSettings
from proxy.tasks import Supervised, Wake, wait_event
from proxy.upstream.pool import UpstreamPool

STOP_WITHIN = 5.0
"""Seconds a stop may take on a loaded machine; a swallowed cancel never ends."""


async def ended_within(stop: Coroutine[Any, Any, None], task: asyncio.Task[Any]) -> bool:
    """Whether ``stop`` returned and ``task`` ended within :data:`STOP_WITHIN`. The stop runs in
    a task of its own and is waited for with ``asyncio.wait`` (which cancels nothing): a
    timeout around the stop itself would cancel it, and a stop that swallowed that cancel
    would look as if it had returned."""
    stopper = asyncio.get_running_loop().create_task(stop)
    done, _ = await asyncio.wait({stopper}, timeout=STOP_WITHIN)
    if stopper not in done:
        stopper.cancel()
        return False
    return task.done()


PASSES = range(6)
"""Loop passes between the wake-up and the cancel."""


async def yield_passes(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)  # one loop pass: the point of the test, not a timed wait


def idle_gate() -> Gate:
    """A feeder with nothing to feed: every round ends at once (an empty queue)."""
    pool = UpstreamPool(UpstreamSettings(urls=("http://127.0.0.1:9",)))
    settings = SchedulerSettings(enabled=True, poll_interval_ms=5000)
    return Gate(settings, MemoryStore(), pool, SchedulerMetrics(CollectorRegistry(), 60))


@pytest.mark.parametrize("passes", PASSES)
async def test_gate_stops_when_woken_as_it_is_cancelled(passes: int) -> None:
    gate = idle_gate()
    gate.start()
    gate.wake()
    await gate.wait_ticks(1)  # one round ran: the feeder is parked in its wait again
    feeder = gate._task
    assert feeder is not None
    gate.wake()
    await yield_passes(passes)
    assert await ended_within(gate.stop(), feeder)


@pytest.mark.parametrize("passes", PASSES)
async def test_wait_event_delivers_a_cancel_that_races_the_event(passes: int) -> None:
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            await wait_event(event, 5.0)
            event.clear()
            rounds += 1

    task = asyncio.get_running_loop().create_task(loop())
    await yield_passes(2)
    event.set()
    await yield_passes(passes)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=STOP_WITHIN)
    assert task in done, f"the cancel was swallowed ({rounds} rounds after it)"
    assert task.cancelled()


async def test_wait_event_answers_whether_it_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.001) is False
    event.set()
    assert await wait_event(event, 5.0) is True


@pytest.mark.parametrize("passes", PASSES)
async def test_supervised_back_off_stops_when_woken_as_it_is_cancelled(passes: int) -> None:
    wake = Wake()
    failed = asyncio.Event()

    async def failing() -> None:
        failed.set()
        raise RuntimeError("Redis is down")

    handle = Supervised(failing, name="test", failures=None, first_delay=5.0, wake=wake)
    handle.start()
    supervisor = handle.task
    assert supervisor is not None
    await failed.wait()
    await yield_passes(2)  # into the back-off's wait
    wake.set()
    await yield_passes(passes)
    assert await ended_within(handle.stop(), supervisor)


async def test_a_stop_that_is_itself_cancelled_says_so() -> None:
    """The caller of a stop cancelled while it waits (a shutdown timeout) is cancelled, not
    told that the task ended."""
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # a slow cleanup

    handle = Supervised(stubborn, name="test", failures=None)
    handle.start()
    await yield_passes(2)
    stopper = asyncio.get_running_loop().create_task(handle.stop())
    await yield_passes(2)
    stopper.cancel()
    release.set()
    done, _ = await asyncio.wait({stopper}, timeout=STOP_WITHIN)
    assert stopper in done
    assert stopper.cancelled()


class SwallowingStore(MemoryStore):
    """Once armed, the next read parks and swallows the cancel it gets, as a Redis command
    cancelled inside redis-py's ``wait_for`` does on Python 3.11."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.parked = asyncio.Event()
        self.swallowed = 0

    async def view(self, per_user: int) -> View:
        if self.armed:
            self.armed = False
            self.parked.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.swallowed += 1
        return await super().view(per_user)


async def test_gate_stops_when_a_library_swallows_the_cancel() -> None:
    store = SwallowingStore()
    pool = UpstreamPool(UpstreamSettings(urls=("http://127.0.0.1:9",)))
    settings = SchedulerSettings(enabled=True, poll_interval_ms=5000)
    gate = Gate(settings, store, pool, SchedulerMetrics(CollectorRegistry(), 60))
    gate.start()
    feeder = gate._task
    assert feeder is not None
    store.armed = True
    gate.wake()
    await store.parked.wait()  # the feeder is inside a store read
    assert await ended_within(gate.stop(), feeder)
    assert store.swallowed == 1


async def test_supervised_stops_when_its_work_swallows_the_cancel() -> None:
    parked = asyncio.Event()

    async def swallows_once() -> None:
        parked.set()
        # What 3.11's wait_for does when its future had just completed:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await asyncio.Event().wait()  # and the work goes on as if nothing had happened

    handle = Supervised(swallows_once, name="test", failures=None)
    handle.start()
    supervisor = handle.task
    assert supervisor is not None
    await parked.wait()
    assert await ended_within(handle.stop(), supervisor)
