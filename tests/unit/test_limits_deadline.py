"""The lag-tolerant deadline: on time on an idle loop, forgiving when the loop itself was busy.

``time.sleep`` in a callback below is the busy proxy (a CPU-bound stretch of the event loop),
not a wait for something to happen.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.limits.deadline import MAX_LAG_GRACE, Deadline


async def test_times_out_on_an_idle_loop() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    never: asyncio.Future[None] = loop.create_future()
    with pytest.raises(TimeoutError):
        async with Deadline(started + 0.02) as deadline:
            await never
    assert deadline.expired
    assert loop.time() - started < 0.5


async def test_a_busy_loop_does_not_turn_a_timely_answer_into_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()
    now = loop.time()
    loop.call_at(now + 0.005, answer.set_result, "reply")  # the reply arrives in time...
    loop.call_soon(time.sleep, 0.1)  # ...while the loop is busy past the deadline
    async with Deadline(now + 0.02) as deadline:
        assert await answer == "reply"
    assert not deadline.expired


async def test_a_silent_dependency_still_times_out_after_a_busy_stretch() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    never: asyncio.Future[None] = loop.create_future()
    loop.call_soon(time.sleep, 0.05)
    with pytest.raises(TimeoutError):
        async with Deadline(started + 0.01):
            await never
    assert loop.time() - started < MAX_LAG_GRACE


async def test_outside_cancellation_is_not_a_timeout() -> None:
    loop = asyncio.get_running_loop()

    async def guarded() -> None:
        async with Deadline(loop.time() + 10):
            await loop.create_future()

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_finishing_in_time_leaves_no_timer_behind() -> None:
    loop = asyncio.get_running_loop()
    async with Deadline(loop.time() + 0.01) as deadline:
        pass
    await asyncio.sleep(0.02)  # past the deadline: nothing fires into this task any more
    assert not deadline.expired
