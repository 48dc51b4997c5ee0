"""Waiting for the gateway queue (``proxy.scheduler``, on by default) in tests that look at
exactly what the fake ComfyUI received."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from proxy.scheduler.keys import GATE
from tests.fakes.comfyui import FakeComfyUI


async def settled(client: TestClient[Any, Any], fake: FakeComfyUI) -> None:
    """Until every prompt the proxy took has run: nothing held, every prompt the gateway queue
    let through seen ending by its feeder (whose own reads of ComfyUI's queue, made while it
    waits for that, then stop), and ComfyUI idle. A condition on the feeder's rounds, not a
    sleep."""
    gate = client.app.get(GATE)
    if gate is not None:
        while await gate.store.held(None) or await gate.store.flights():
            gate.wake()
            await gate.wait_ticks(1)
        # A round that began before the last prompt was seen ending may still be reading.
        gate.wake()
        await gate.wait_ticks(1)
    await fake.wait_idle()
