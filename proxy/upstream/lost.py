"""Prompts of an instance that became unavailable: reported as failed, never silently lost.

ComfyUI keeps its queue in memory: when an instance dies (or is removed) with prompts pending
or running, they are gone. With several instances the proxy:

1. knows what each instance holds: :class:`QueueWatch` reads each instance's unfinished
   prompts every ``upstream.lost_watch_seconds`` (``/api/jobs?status=in_progress,pending``,
   which lists ids without the workflows; ``/queue`` on servers without the jobs API), and
   is also fed by every merged ``/queue`` the proxy fetches anyway and by the fan-in's
   end-of-prompt events;
2. on the pool's ``down`` or ``left`` event for an instance, turns each prompt it held into a
   :class:`LostPrompt`: counted (``comfygate_prompts_lost_total{upstream}``), told to its owner's
   open sockets as an ``execution_error`` (the shape ComfyUI sends, protocol doc 4.3, which the
   stock UI shows in its error dialog) followed by ``executing {node: null}``, and kept so
   that ``/history/{id}``, ``/history``, ``/api/jobs`` and ``/api/jobs/{id}`` answer it as a
   failed prompt with that message instead of forgetting it.

Lost records live in process memory (each proxy replica watches every instance itself, so
each reaches the same conclusion); they expire after ``isolation.retention_seconds``. If the
instance comes back and did finish a prompt after all, its real history entry wins (sticky
routing asks the instance first).

Resubmitting lost prompts elsewhere is not done: the proxy does not keep prompt bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import hdrs

from proxy.errors import UpstreamError
from proxy.isolation.ownership import OwnershipStore
from proxy.observability.metrics import Metrics
from proxy.tasks import supervise
from proxy.upstream.encoding import BACKGROUND_LIMIT, IDENTITY, read_client_answer
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.lost")

LOST_EXCEPTION_TYPE = "comfygate.InstanceUnavailable"
MAX_LOST = 10_000
JOBS_WATCH_PATH = "/api/jobs?status=in_progress,pending"

Notify = Callable[[str, list[str]], Awaitable[int]]
"""``notify(upstream_client_id, text_frames)``: frames to that client id's open sockets;
returns how many sockets got them."""


@dataclass(frozen=True, slots=True)
class LostPrompt:
    prompt_id: str
    upstream: str
    lost_at: float
    """Epoch seconds."""
    number: float
    """The prompt's queue number when it was last seen (0 when unknown)."""

    @property
    def message(self) -> str:
        return (
            f"ComfyUI instance {self.upstream} became unavailable before this prompt finished; "
            "it was lost. Queue it again."
        )

    @property
    def timestamp_ms(self) -> int:
        return int(self.lost_at * 1000)

    def error_data(self) -> dict[str, Any]:
        """``execution_error`` data as ComfyUI sends it (every field the UI reads)."""
        return {
            "prompt_id": self.prompt_id,
            "node_id": None,
            "node_type": "",
            "executed": [],
            "exception_message": self.message,
            "exception_type": LOST_EXCEPTION_TYPE,
            "traceback": [],
            "current_inputs": {},
            "current_outputs": [],
            "timestamp": self.timestamp_ms,
        }

    def frames(self) -> list[str]:
        """What the owner's sockets receive: the error, then the end of the prompt."""
        return [
            orjson.dumps({"type": "execution_error", "data": self.error_data()}).decode(),
            orjson.dumps(
                {"type": "executing", "data": {"node": None, "prompt_id": self.prompt_id}}
            ).decode(),
        ]

    def history_entry(self) -> dict[str, Any]:
        """A history entry in ComfyUI's shape, failed with the message."""
        return {
            "prompt": [self.number, self.prompt_id, {}, {}, []],
            "outputs": {},
            "status": {
                "status_str": "error",
                "completed": False,
                "messages": [["execution_error", self.error_data()]],
            },
            "meta": {},
        }

    def job(self, *, detail: bool = False) -> dict[str, Any]:
        """A ``/api/jobs`` item (or detail) in ComfyUI's shape, ``failed``."""
        job: dict[str, Any] = {
            "id": self.prompt_id,
            "status": "failed",
            "priority": self.number,
            "execution_end_time": self.timestamp_ms,
            "execution_error": self.error_data(),
            "outputs_count": 0,
            "previewable_outputs_count": 0,
        }
        if detail:
            job["outputs"] = {}
            job["execution_status"] = self.history_entry()["status"]
            job["workflow"] = {"prompt": {}, "extra_data": {}}
        return job


class LostStore:
    """Lost prompts by id, bounded and expiring."""

    def __init__(self, retention_seconds: float, *, clock: Callable[[], float] = time.time):
        self._retention = retention_seconds
        self._clock = clock
        self._lost: OrderedDict[str, LostPrompt] = OrderedDict()

    def add(self, lost: LostPrompt) -> bool:
        """Keep ``lost``; False when that prompt was already reported."""
        if self.get(lost.prompt_id) is not None:
            return False
        self._lost[lost.prompt_id] = lost
        while len(self._lost) > MAX_LOST:
            self._lost.popitem(last=False)
        return True

    def get(self, prompt_id: str) -> LostPrompt | None:
        lost = self._lost.get(prompt_id)
        if lost is not None and lost.lost_at + self._retention < self._clock():
            del self._lost[prompt_id]
            return None
        return lost

    def discard(self, prompt_id: str) -> None:
        """Forget one (its history entry was deleted)."""
        self._lost.pop(prompt_id, None)

    def clear(self) -> None:
        self._lost.clear()

    def all(self) -> list[LostPrompt]:
        """Every live record, oldest first."""
        horizon = self._clock() - self._retention
        while self._lost and next(iter(self._lost.values())).lost_at < horizon:
            self._lost.popitem(last=False)
        return list(self._lost.values())

    def __len__(self) -> int:
        return len(self._lost)


@dataclass(slots=True)
class _Held:
    number: float
    noted_at: float
    """monotonic time the proxy learnt of it (snapshots older than this do not drop it)."""


class QueueWatch:
    """Which unfinished prompts each instance holds, as last seen."""

    def __init__(self) -> None:
        self._held: dict[str, dict[str, _Held]] = {}

    def observe(self, upstream: str, items: Iterable[tuple[str, float]], asked_at: float) -> None:
        """A fresh view of ``upstream``'s unfinished ``(prompt_id, number)`` pairs, asked for at
        ``asked_at`` (monotonic): prompts learnt of after that are kept."""
        previous = self._held.get(upstream, {})
        held = {pid: _Held(number, asked_at) for pid, number in items}
        for pid, seen in previous.items():
            if seen.noted_at > asked_at and pid not in held:
                held[pid] = seen
        self._held[upstream] = held

    def note_submitted(self, upstream: str, prompt_id: str, number: float = 0) -> None:
        self._held.setdefault(upstream, {})[prompt_id] = _Held(number, time.monotonic())

    def note_finished(self, prompt_id: str) -> None:
        for held in self._held.values():
            held.pop(prompt_id, None)

    def take(self, upstream: str) -> dict[str, float]:
        """Forget and return what ``upstream`` held: ``{prompt_id: number}``."""
        return {pid: seen.number for pid, seen in self._held.pop(upstream, {}).items()}

    def held(self, upstream: str) -> set[str]:
        return set(self._held.get(upstream, {}))


def queue_items(queue: object) -> list[tuple[str, float]]:
    """``(prompt_id, number)`` of a ``GET /queue`` answer's running and pending items."""
    out: list[tuple[str, float]] = []
    if not isinstance(queue, dict):
        return out
    for section in ("queue_running", "queue_pending"):
        items = queue.get(section)
        for item in items if isinstance(items, list) else ():
            if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str):
                number = item[0] if isinstance(item[0], (int, float)) else 0
                out.append((item[1], number))
    return out


def job_items(answer: object) -> list[tuple[str, float]]:
    """``(prompt_id, priority)`` of a ``GET /api/jobs`` answer."""
    jobs = answer.get("jobs") if isinstance(answer, dict) else None
    out: list[tuple[str, float]] = []
    for job in jobs if isinstance(jobs, list) else ():
        if isinstance(job, dict) and isinstance(job.get("id"), str):
            priority = job.get("priority")
            out.append((job["id"], priority if isinstance(priority, (int, float)) else 0))
    return out


class LostPrompts:
    """The watch, the records and the reaction to an instance going away (see module doc)."""

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        ownership: OwnershipStore,
        metrics: Metrics,
        retention_seconds: float,
        watch_seconds: float,
        timeout_seconds: float,
        notify: Notify,
    ) -> None:
        self.pool = pool
        self.ownership = ownership
        self.metrics = metrics
        self.watch = QueueWatch()
        self.store = LostStore(retention_seconds)
        self._watch_seconds = watch_seconds
        self._timeout = timeout_seconds
        self._notify = notify
        self._no_jobs_api: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._watch_seconds > 0:
            # Supervised: a failure the loop does not expect restarts it (logged, counted).
            self._task = asyncio.create_task(
                supervise(self._watch_loop, name="lost_watch", failures=self.metrics.task_failures)
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def on_pool_event(self, event: str, upstream: Upstream) -> None:
        """``pool.subscribe`` listener."""
        if event in ("down", "left"):
            await self.instance_lost(upstream)

    # -- watching -------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        while True:
            if len(self.pool.upstreams) > 1:  # one instance: nothing to fail over to
                await asyncio.gather(
                    *(self.refresh(u) for u in self.pool.reachable()), return_exceptions=True
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._watch_seconds)
            self._wake.clear()

    async def refresh(self, upstream: Upstream) -> None:
        """Read what ``upstream`` holds now (jobs API first: ids without the workflows)."""
        asked_at = time.monotonic()
        if upstream.name not in self._no_jobs_api:
            status, body = await self._get(upstream, JOBS_WATCH_PATH)
            if status == 200:
                self.watch.observe(upstream.name, job_items(_loads(body)), asked_at)
                return
            if status is None:
                return
            self._no_jobs_api.add(upstream.name)  # an older ComfyUI: 404
        status, body = await self._get(upstream, "/queue")
        if status == 200:
            self.watch.observe(upstream.name, queue_items(_loads(body)), asked_at)

    async def _get(self, upstream: Upstream, path: str) -> tuple[int | None, bytes]:
        try:
            async with self.pool.session.get(
                upstream.url_for(path),
                headers={hdrs.HOST: upstream.host_header, hdrs.ACCEPT_ENCODING: IDENTITY},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                body = await read_client_answer(
                    resp, limit=BACKGROUND_LIMIT, upstream=upstream.name, metrics=self.metrics
                )
                return resp.status, body
        except (TimeoutError, aiohttp.ClientError, OSError, UpstreamError):
            return None, b""  # unreadable: as if not answered (nothing is inferred from it)

    def observe_queue(self, upstream: Upstream, queue: object, asked_at: float) -> None:
        """A ``GET /queue`` answer the proxy fetched anyway (merged views)."""
        self.watch.observe(upstream.name, queue_items(queue), asked_at)

    # -- an instance went away -------------------------------------------------------------
    async def instance_lost(self, upstream: Upstream) -> list[LostPrompt]:
        """Report every prompt ``upstream`` held as lost (idempotent per prompt)."""
        held = self.watch.take(upstream.name)
        now = time.time()
        reported: list[LostPrompt] = []
        for prompt_id, number in held.items():
            lost = LostPrompt(prompt_id, upstream.name, now, number)
            if not self.store.add(lost):
                continue
            reported.append(lost)
            self.metrics.prompts_lost.labels(upstream.name).inc()
            record = await self.ownership.prompt(prompt_id)
            told = 0
            if record is not None and record.client_id:
                told = await self._notify(record.client_id, lost.frames())
            log.warning(
                "prompt_lost",
                prompt_id=prompt_id,
                upstream=upstream.name,
                owner_sockets=told,
            )
        return reported

    def lost(self, prompt_id: str) -> LostPrompt | None:
        return self.store.get(prompt_id)


def _loads(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


__all__ = [
    "LOST_EXCEPTION_TYPE",
    "LostPrompt",
    "LostPrompts",
    "LostStore",
    "QueueWatch",
    "job_items",
    "queue_items",
]
