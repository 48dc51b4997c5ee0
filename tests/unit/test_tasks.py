"""``proxy.tasks``: a supervised task is restarted after a failure (logged and counted, with a
growing back-off that a stable run resets), ends when its work returns, stops when cancelled;
``Periodic`` counts its failed rounds the same way.

The back-off is observed through a :class:`~proxy.tasks.Wake` that records each pause and
returns at once: no test waits out a delay.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from proxy.periodic import Periodic
from proxy.tasks import Supervised, Wake, supervise, task_failed


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def exception(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


class InstantWake(Wake):
    """Records each back-off and returns at once."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses: list[float] = []

    async def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)


def failures() -> tuple[Counter, CollectorRegistry]:
    registry = CollectorRegistry()
    counter = Counter("comfygate_task_failures", "t", ("task",), registry=registry)
    return counter, registry


def count(registry: CollectorRegistry, task: str) -> float:
    return registry.get_sample_value("comfygate_task_failures_total", {"task": task}) or 0.0


async def test_a_failing_run_is_restarted_logged_and_counted_until_it_returns() -> None:
    counter, registry = failures()
    log, wake = RecordingLog(), InstantWake()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise ConnectionError(f"failure {runs}")

    await supervise(
        work,
        name="link",
        failures=counter,
        logger=log,
        first_delay=0.5,
        max_delay=3.0,
        stable_seconds=3600,
        wake=wake,
    )
    assert runs == 5  # the fifth run returned: supervision ended
    assert count(registry, "link") == 4
    assert [event for event, _ in log.events] == ["task_restarting"] * 4
    assert [fields["task"] for _, fields in log.events] == ["link"] * 4
    assert wake.pauses == [0.5, 1.0, 2.0, 3.0]  # doubling, capped


async def test_a_run_that_lasted_stable_seconds_restarts_after_the_first_delay() -> None:
    counter, _ = failures()
    wake = InstantWake()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError("bug")

    await supervise(
        work,
        name="t",
        failures=counter,
        logger=RecordingLog(),
        first_delay=0.5,
        stable_seconds=0,  # every run counts as stable
        wake=wake,
    )
    assert wake.pauses == [0.5, 0.5, 0.5]


async def test_cancellation_stops_it_without_a_restart() -> None:
    counter, registry = failures()
    started = asyncio.Event()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.Event().wait()  # runs until cancelled

    task = asyncio.create_task(supervise(work, name="t", failures=counter, logger=RecordingLog()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runs == 1
    assert count(registry, "t") == 0


async def test_wake_cuts_a_back_off_short_and_stop_ends_it() -> None:
    counter, registry = failures()
    runs = 0
    failed, second = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            failed.set()
            raise OSError("refused")
        second.set()
        await asyncio.Event().wait()

    handle = Supervised(
        work, name="watch", failures=counter, logger=RecordingLog(), first_delay=3600
    )
    handle.start()
    handle.start()  # a second start while it runs does nothing
    await failed.wait()
    handle.wake()
    await asyncio.wait_for(second.wait(), 10)  # an hour's back-off, cut short
    assert count(registry, "watch") == 1
    assert handle.running
    await handle.stop()
    assert not handle.running
    assert runs == 2


def test_task_failed_logs_and_counts_without_a_counter_too() -> None:
    counter, registry = failures()
    log = RecordingLog()
    try:
        raise ValueError("x")
    except ValueError:
        task_failed("a", counter, logger=log, event="e", extra=1)
        task_failed("b", None, logger=log)
    assert log.events == [("e", {"task": "a", "extra": 1}), ("task_failed", {"task": "b"})]
    assert count(registry, "a") == 1


async def test_a_wake_before_the_back_off_is_kept_for_it() -> None:
    wake = Wake()
    wake.set()
    await asyncio.wait_for(wake.pause(3600), 10)  # returns at once
    waiting = asyncio.ensure_future(wake.pause(3600))
    done, _ = await asyncio.wait((waiting,), timeout=0)
    assert not done  # consumed: the next pause waits again
    wake.set()
    await asyncio.wait_for(waiting, 10)


async def test_periodic_counts_each_failed_round_under_its_name() -> None:
    counter, registry = failures()
    log = RecordingLog()
    rounds = 0
    third = asyncio.Event()

    async def work() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 3:
            third.set()
        if rounds <= 2:
            raise RuntimeError("Redis is down")

    loop = Periodic(
        work,
        0.001,
        name="comfygate-health-checks",
        log=log,
        event="checks_failed",
        immediately=True,
        failures=counter,
    )
    loop.start()
    await asyncio.wait_for(third.wait(), 10)
    await loop.stop()
    assert count(registry, "health-checks") == 2
    assert [event for event, _ in log.events] == ["checks_failed", "checks_failed"]
