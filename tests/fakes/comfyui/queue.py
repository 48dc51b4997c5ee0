"""``PromptQueue``, history and the worker loop (ComfyUI 0.3.64 ``execution.PromptQueue`` and
``main.prompt_worker``).

* Pending prompts are a heap of 5-element tuples ``(number, prompt_id, prompt, extra_data,
  outputs_to_execute)``; ``/queue`` lists them in heap order (interrupt-and-queue.json).
* Every change (put, get, task_done, delete, wipe) broadcasts ``status`` with
  ``queue_remaining`` = pending + running.
* History is insertion ordered; sensitive ``extra_data`` keys are stripped when a prompt finishes
  (the 0.3.64 queue still shows them, as docs/comfyui-protocol.md#queue-interrupt-memory notes).
* After each prompt: ``task_done`` (status broadcast) then ``executing {node: null}`` to the
  client, as in every run capture.

Test hooks not in ComfyUI: :meth:`hold`/:meth:`release` (a gate the worker waits at after
``execution_cached`` and before the first node, so the prompt shows as running),
:meth:`wait_held` and :meth:`wait_idle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from .executor import Executor

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
MAXIMUM_HISTORY_SIZE = 10000

QueueItem = tuple[Any, str, dict[str, Any], dict[str, Any], list[str]]


class PromptQueue:
    """Queue, running set, history and the worker task."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.queue: list[QueueItem] = []
        self.currently_running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.task_counter = 0
        self.number = 0  # PromptServer.number
        self.flags: dict[str, Any] = {}
        self._changed = asyncio.Condition()
        self._busy = False
        self._gate = asyncio.Event()
        self._gate.set()
        self._held: str | None = None
        self.execution_seconds = 0.0
        """Fake-only: how long each prompt "executes" (the GPU's time), for benchmarks."""
        self.started: list[tuple[str, float]] = []
        """Fake-only: (prompt id, monotonic time) each prompt started executing."""
        self.ended: list[tuple[str, float]] = []
        """Fake-only: (prompt id, monotonic time) each prompt's execution ended."""
        self._task: asyncio.Task[None] | None = None
        self.executor.gate = self._wait_gate

    # -- ComfyUI's state, seen by routes -------------------------------------------------
    @property
    def client_id(self) -> str | None:
        return self.executor.client_id

    @property
    def last_node_id(self) -> str | None:
        return self.executor.last_node_id

    def remaining(self) -> int:
        return len(self.queue) + len(self.currently_running)

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    async def queue_updated(self) -> None:
        await self.executor.sockets.send_json("status", {"status": self.queue_info()}, None)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- PromptQueue API -------------------------------------------------------------------
    async def put(self, item: QueueItem) -> None:
        heapq.heappush(self.queue, item)
        await self.queue_updated()

    def current_queue(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """``get_current_queue_volatile``: running items and the raw heap."""
        return list(self.currently_running.values()), list(self.queue)

    async def wipe_queue(self) -> None:
        self.queue = []
        await self.queue_updated()

    async def delete_queue_item(self, match: Callable[[QueueItem], bool]) -> bool:
        for x in range(len(self.queue)):
            if match(self.queue[x]):
                if len(self.queue) == 1:
                    await self.wipe_queue()
                else:
                    self.queue.pop(x)
                    heapq.heapify(self.queue)
                await self.queue_updated()
                return True
        return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        if prompt_id is None:
            out: dict[str, Any] = {}
            if offset < 0 and max_items is not None:
                offset = len(self.history) - max_items
            for i, key in enumerate(self.history):
                if i >= offset:
                    out[key] = self.history[key]
                    if max_items is not None and len(out) >= max_items:
                        break
            return out
        if prompt_id in self.history:
            return {prompt_id: copy.deepcopy(self.history[prompt_id])}
        return {}

    def wipe_history(self) -> None:
        self.history = {}

    def delete_history_item(self, prompt_id: Any) -> None:
        if isinstance(prompt_id, str):
            self.history.pop(prompt_id, None)

    def interrupt(self) -> None:
        """``nodes.interrupt_processing()``: flag checked before each node and at progress."""
        self.executor.interrupted = True

    # -- worker ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _get(self) -> tuple[QueueItem, int]:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self.queue))
            item = heapq.heappop(self.queue)
            item_id = self.task_counter
            self.currently_running[item_id] = copy.deepcopy(item)
            self.task_counter += 1
            self._busy = True
        await self.queue_updated()
        return item, item_id

    async def _worker(self) -> None:
        while True:
            item, item_id = await self._get()
            _number, prompt_id, prompt, extra_data, outputs = item
            try:
                await self.executor.execute(prompt, prompt_id, dict(extra_data), outputs)
            except Exception:  # a bug in the fake must not kill the worker
                logging.getLogger(__name__).exception("fake ComfyUI worker failed")
                self.executor.success = False
            finally:
                await self._task_done(item_id)
                client_id = self.executor.client_id
                if client_id is not None:
                    await self.executor.sockets.send_json(
                        "executing", {"node": None, "prompt_id": prompt_id}, client_id
                    )
                self._busy = False
                await self._notify()

    async def _task_done(self, item_id: int) -> None:
        prompt = self.currently_running.pop(item_id)
        self.ended.append((prompt[1], time.monotonic()))
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        extra_data = prompt[3]
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            extra_data.pop(key, None)
        ex = self.executor
        self.history[prompt[1]] = {
            "prompt": list(prompt),
            "outputs": {},
            "status": {
                "status_str": "success" if ex.success else "error",
                "completed": ex.success,
                "messages": [list(m) for m in ex.status_messages],
            },
        }
        self.history[prompt[1]].update(ex.history_result)
        await self.queue_updated()

    # -- test hooks -----------------------------------------------------------------------
    def preload_history(self, count: int, padding: int = 0) -> list[str]:
        """``count`` finished prompts of nobody's, straight into history in ComfyUI's stored
        shape (running that many would take minutes); ``padding`` bytes of workflow each.
        Returns their ids, oldest first."""
        ids: list[str] = []
        now = int(time.time() * 1000)
        extra = {"create_time": now, "extra_pnginfo": {"workflow": {"pad": "x" * padding}}}
        for n in range(count):
            prompt_id = str(uuid.uuid4())
            ids.append(prompt_id)
            stamp = {"prompt_id": prompt_id, "timestamp": now}
            self.history[prompt_id] = {
                "prompt": [n, prompt_id, {}, extra, []],
                "outputs": {},
                "status": {
                    "status_str": "success",
                    "completed": True,
                    "messages": [["execution_start", stamp], ["execution_success", stamp]],
                },
                "meta": {},
            }
        return ids

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def _wait_gate(self, prompt_id: str) -> None:
        self.started.append((prompt_id, time.monotonic()))
        if self.execution_seconds > 0:
            await asyncio.sleep(self.execution_seconds)  # simulated GPU time, not a sync
        if not self._gate.is_set():
            self._held = prompt_id
            await self._notify()
            await self._gate.wait()
            self._held = None

    async def wait_held(self) -> str:
        """Until the worker waits at the hold gate; returns that prompt id."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._held is not None)
            assert self._held is not None
            return self._held

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate`` holds (checked at each queue change: put, start, end, delete)."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def wait_idle(self) -> None:
        """Until nothing is pending or running and the last prompt's messages are sent."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self.queue and not self._busy)
