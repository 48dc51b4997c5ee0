"""How counted prompts stop counting when they end, besides expiry (see :mod:`.quota`).

- Fast path, :class:`QuotaEventObserver`: installed on every relayed WebSocket of a principal
  whose prompts are counted; when ComfyUI reports a prompt finished (``execution_success``),
  failed (``execution_error``), interrupted (``execution_interrupted``) or done
  (``executing {node: null}``), the prompt is released *before* the frame reaches the client,
  so a client that sees its prompt end can queue the next one at once.
- Safety net, :class:`QuotaReconciler`: one task per proxy process reads each ComfyUI's
  ``GET /queue`` every ``rate_limits.quota_poll_seconds`` and releases the prompts counted on
  it that it no longer lists. That covers API clients without a socket, ``POST /queue``
  deletes and clears, interrupts, and ComfyUI restarts.
- On demand, :meth:`QuotaReconciler.refresh`: a submission refused over its user's quota has
  the queues read once more before the refusal stands, so an API client without a socket that
  runs one prompt at a time on a fast model (each ends long before the next poll) is not
  refused for prompts that have ended. One such read at a time: refusals arriving while it
  runs share it (and refusals are bounded by the ``submit`` rate limit).

The reconciler's race: a prompt is counted before it is forwarded, and ComfyUI lists it only
once it has accepted it. So only entries known to be accepted when the poll *starts* are
checked - marked by the submission's 200 answer, or reserved longer ago than the longest a
submission can take (``upstream.connect_timeout_seconds + read_timeout_seconds``: the answer
was lost, e.g. the client went away) - and the queue is read after that snapshot. An accepted
prompt missing from a queue read after its acceptance has ended. With several instances, every
instance's queue is read and a prompt counts as live if any lists it (placement may have failed
it over to another instance than the one it was counted on); an instance whose queue cannot be
read releases nothing of its own that poll.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

import orjson
import structlog

from proxy.comfy.frames import END_EVENTS
from proxy.limits.quota.model import Snapshot
from proxy.limits.quota.service import QueueQuota, StoreFailed
from proxy.periodic import Periodic
from proxy.settings import Settings
from proxy.state import UNDECIDED, Undecided
from proxy.upstream.pool import Upstream, UpstreamPool
from proxy.upstream.queue_read import queued_ids

log = structlog.get_logger("comfygate.quota")

REFRESH_TIMEOUT_SECONDS: Final = 2.0
"""Bound on an on-demand poll: past it the refusal stands (the periodic poll goes on)."""
SEEN_ENDS: Final = 64
"""Prompt ends remembered per socket (a success is reported twice: no second release)."""
_END_MARKERS: Final = tuple(f'"{t}"' for t in sorted(END_EVENTS))


def ended_prompt(frame: str) -> str | None:
    """The prompt id a ComfyUI text frame reports ended, else None. Cheap for every other
    frame: substring tests before any JSON parse."""
    if not _may_end(frame):
        return None
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or not isinstance(data := message.get("data"), dict):
        return None
    kind = message.get("type")
    ended = kind in END_EVENTS or (kind == "executing" and data.get("node", "") is None)
    prompt_id = data.get("prompt_id")
    return prompt_id if ended and isinstance(prompt_id, str) and prompt_id else None


def _may_end(frame: str) -> bool:
    """Substring tests: False proves ``frame`` reports no prompt's end."""
    return any(m in frame for m in _END_MARKERS) or ('"executing"' in frame and "null" in frame)


class QuotaEventObserver:
    """A WebSocket frame filter that releases prompts as their end events go by and passes
    every frame on unchanged (first in ``ctx.frame_filters``: it sees what isolation drops)."""

    def __init__(self, quota: QueueQuota) -> None:
        self._quota = quota
        self._seen: OrderedDict[str, None] = OrderedDict()

    def quick(self, frame: str | bytes) -> str | bytes | Undecided | None:
        """Frames that cannot end a prompt pass unchanged without the full call (``ws_fast``)."""
        if isinstance(frame, str) and _may_end(frame):
            return UNDECIDED
        return frame

    async def __call__(self, frame: str | bytes) -> str | bytes | None:
        prompt_id = ended_prompt(frame) if isinstance(frame, str) else None
        if prompt_id is not None and prompt_id not in self._seen:
            self._seen[prompt_id] = None
            if len(self._seen) > SEEN_ENDS:
                self._seen.popitem(last=False)
            await self._quota.release([prompt_id], reason="event")
        return frame


class QuotaReconciler:
    """Releases counted prompts that ComfyUI no longer lists (see the module doc)."""

    def __init__(self, quota: QueueQuota, pool: UpstreamPool, settings: Settings) -> None:
        self._quota = quota
        self._pool = pool
        self.interval = settings.rate_limits.quota_poll_seconds
        upstream = settings.upstream
        self.grace = upstream.connect_timeout_seconds + upstream.read_timeout_seconds
        """Unanswered submissions older than this are reconciled as if accepted."""
        self._gauge = quota.metrics.queue_quota_in_use
        # The poll period itself, not a synchronisation (tests wait with wait_polls).
        self._loop = Periodic(
            self.poll_once,
            self.interval,
            name="quota-poll",
            log=log,
            event="queue_quota_poll_failed",
            failures=quota.metrics.task_failures,
        )
        self._lock = asyncio.Lock()
        self._polled = asyncio.Condition()
        self.polls = 0
        """Completed polls (tests wait on it with :meth:`wait_polls`)."""
        self._refreshing: asyncio.Task[int] | None = None
        """The on-demand poll of refused submissions, while it runs."""
        self.also_live: Callable[[], Awaitable[set[str]]] | None = None
        """Prompts live though no instance lists them (held by ``proxy.scheduler``)."""

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)

    async def wait_polls(self, count: int) -> None:
        """Until at least ``count`` polls have completed (for tests and diagnostics)."""
        async with self._polled:
            await self._polled.wait_for(lambda: self.polls >= count)

    async def poll_once(self) -> int:
        """Reconcile every upstream once; how many prompts were released."""
        async with self._lock:  # the loop and a caller (tests) never interleave
            released = await self._poll_locked()
        async with self._polled:
            self._polled.notify_all()
        return released

    async def refresh(self) -> int:
        """Reconcile now for a refused submission (see the module doc); how many prompts were
        released (0 when it took longer than :data:`REFRESH_TIMEOUT_SECONDS`). Refusals that
        arrive while such a poll runs share it: one on-demand poll at a time."""
        running = self._refreshing
        if running is None or running.done():
            running = self._refreshing = asyncio.create_task(self.poll_once())
        try:
            # Shielded: one refused request going away must not cancel the others' poll.
            return await asyncio.wait_for(asyncio.shield(running), REFRESH_TIMEOUT_SECONDS)
        except TimeoutError:
            log.info("queue_quota_refresh_timeout")
            return 0

    async def _poll_locked(self) -> int:
        released = await self._reconcile(list(self._pool.upstreams))
        self.polls += 1
        return released

    async def _reconcile(self, upstreams: list[Upstream]) -> int:
        quota = self._quota
        snapshots: dict[str, Snapshot] = {}
        # Acceptances this process has seen but not yet written (they are batched off the
        # response path): written first, so that none is missed by this snapshot.
        await quota.settle()
        for upstream in upstreams:  # first: only what was accepted before the queues are read
            try:
                snapshots[upstream.name] = await quota.bounded(
                    quota.store.snapshot(upstream.name, self.grace), "snapshot"
                )
            except StoreFailed as exc:  # logged; the next poll tries again
                log.warning("queue_quota_snapshot_failed", upstream=upstream.name, error=exc.kind)
        queues: dict[str, set[str] | None] = {}
        live: set[str] = set()
        also = self.also_live if any(s.candidates for s in snapshots.values()) else None
        if also is not None:
            # Held in the gateway queue or being sent to ComfyUI (proxy.scheduler): read
            # before and after the queues, so that a prompt that moves between the gateway
            # queue and ComfyUI meanwhile (released, or taken back) is in one of the reads.
            live |= await also()
        if any(s.candidates for s in snapshots.values()):
            # Every instance's queue: a prompt that failed over to another instance than the
            # one it was counted on is still live there.
            read = await asyncio.gather(
                *(queued_ids(self._pool, u, reader="queue_quota") for u in upstreams)
            )
            queues = {u.name: q for u, q in zip(upstreams, read, strict=True)}
        live |= set().union(*(q for q in queues.values() if q is not None))
        if also is not None:
            live |= await also()
        released = 0
        for name, snapshot in snapshots.items():
            freed = 0
            if snapshot.candidates and queues.get(name) is not None:
                ended = [pid for pid in snapshot.candidates if pid not in live]
                freed = await quota.release(ended, reason="reconciled")
                if (generation := quota.metrics.generation) is not None:
                    for prompt_id in ended:  # ended unseen by a relay: count it from history
                        generation.prompt_left_queue(prompt_id, name)
                if freed:
                    log.info("queue_quota_reconciled", upstream=name, released=freed)
            self._gauge.labels(name).set(max(0, snapshot.in_use - freed))
            released += freed
        return released


__all__ = ["QuotaEventObserver", "QuotaReconciler", "ended_prompt"]
