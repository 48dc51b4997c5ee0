"""``proxy.periodic.Periodic``: rounds repeat, a failing round is logged and the loop goes on,
``stop`` ends it for good."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.periodic import Periodic


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[str] = []

    def exception(self, event: str, **_: Any) -> None:
        self.events.append(event)


async def test_rounds_repeat_and_a_failure_does_not_end_the_loop() -> None:
    log = RecordingLog()
    rounds = 0
    third = asyncio.Event()

    async def work() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 3:
            third.set()
        if rounds == 1:
            raise RuntimeError("a bug in one round")

    loop = Periodic(work, 0.001, name="t", log=log, event="round_failed", immediately=True)
    loop.start()
    loop.start()  # a second start while running does nothing
    assert loop.running
    await asyncio.wait_for(third.wait(), 10)
    await loop.stop()
    assert not loop.running
    assert log.events == ["round_failed"]
    stopped_at = rounds
    await asyncio.sleep(0.01)  # would be several periods: nothing runs after stop()
    assert rounds == stopped_at


async def test_the_first_round_waits_a_period_unless_immediately() -> None:
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    loop = Periodic(work, 3600, name="t", log=RecordingLog(), event="e", fixed_rate=True)
    loop.start()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not ran.is_set()
    await loop.stop()
