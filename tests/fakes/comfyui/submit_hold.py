"""Fake-only: stop the next ``POST /prompt`` at a chosen point until the test lets it go.

A proxy killed while its submission is in flight is the case this makes deterministic: the
test arms the hold, waits until the submission arrives (:meth:`SubmitHold.wait_arrived`), kills
the sender, then lets the request go on (:meth:`SubmitHold.let_go`):

- ``before_queue``: the request is stopped after ComfyUI's validation, before the prompt is
  queued; ``let_go(accept=False)`` drops it (the sender died before ComfyUI took it), ``True``
  queues it;
- ``after_queue``: the prompt is queued (it runs), only the answer waits (the sender died
  before it learnt ComfyUI has it).

One-shot: submissions after the stopped one pass straight through.
"""

from __future__ import annotations

import asyncio
from typing import Literal

Point = Literal["before_queue", "after_queue"]


class SubmitHold:
    """See the module doc."""

    def __init__(self) -> None:
        self.point: Point | None = None
        self.prompt_id: str | None = None
        self._arrived = asyncio.Event()
        self._go = asyncio.Event()
        self._accept = True

    def arm(self, point: Point) -> None:
        self.point = point
        self.prompt_id = None
        self._arrived.clear()
        self._go.clear()

    async def at(self, point: Point, prompt_id: str) -> bool:
        """Called by ``POST /prompt`` at ``point``; False: drop the submission."""
        if self.point != point or self.prompt_id is not None:
            return True
        self.prompt_id = prompt_id
        self._arrived.set()
        await self._go.wait()
        self.point = None
        return self._accept

    async def wait_arrived(self) -> str:
        """Until a submission is stopped; its prompt id."""
        await self._arrived.wait()
        assert self.prompt_id is not None
        return self.prompt_id

    def let_go(self, *, accept: bool = True) -> None:
        self._accept = accept
        self._go.set()


__all__ = ["Point", "SubmitHold"]
