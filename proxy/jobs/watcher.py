"""The background job watcher: every unfinished job's end is recorded, waiting client or not.

A job accepted by ``POST /jobs`` is *followed*: it is put in a due set
(:mod:`proxy.jobs.leases`, shared by the replicas through Redis) and, every
``jobs.watch_seconds``, one replica claims it and reads its state from ComfyUI. The end of a
job - found here, by a request that read the state (``?wait``, ``GET``, the event stream), or
announced by the live event stream (:mod:`proxy.jobs.live`, :meth:`JobWatcher.end_seen`)
- goes through :meth:`JobWatcher.ended`, which may run any number of times, on any replica:

* the job's webhook message is enqueued once (the outbox's marker makes the second a no-op);
* a template's cache entry is stored on success (first result wins, ``SET NX``);
* the job leaves the due set; the one call that removed it counts and logs the end.

A job whose instance cannot be read stays followed until its record expires. The loop is
a supervised task: a failure is logged, counted and the loop starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import structlog

from proxy.jobs.cache import ResultCache
from proxy.jobs.leases import DueSet
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.status import TERMINAL, JobState, read_state
from proxy.jobs.store import JobRecord, JobStore
from proxy.jobs.view import job_view
from proxy.jobs.webhooks import signing
from proxy.jobs.webhooks.delivery import Dispatcher
from proxy.jobs.webhooks.outbox import Message, Outbox
from proxy.settings.jobs import JobsSettings
from proxy.upstream.pool import UpstreamPool

log = structlog.get_logger("comfygate.jobs")

BATCH = 64
_EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}


def webhook_payload(view: dict[str, object], status: str, now: float) -> str:
    """The notification's body (Standard Webhooks' ``type``/``timestamp``/``data`` shape)."""
    stamp = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
    return orjson.dumps(
        {"type": _EVENT_TYPES.get(status, "job.ended"), "timestamp": stamp, "data": view}
    ).decode()


class JobWatcher:
    def __init__(
        self,
        settings: JobsSettings,
        *,
        base_path: str,
        pool: UpstreamPool,
        store: JobStore,
        cache: ResultCache,
        metrics: JobMetrics,
        due: DueSet,
        outbox: Outbox,
        dispatcher: Dispatcher | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.base_path = base_path
        self.pool = pool
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.due = due
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.clock = clock
        self._wake = asyncio.Event()
        self._closing = False
        self._recent: deque[str] = deque(maxlen=1024)
        self._ended = asyncio.Condition()

    async def follow(self, record: JobRecord) -> None:
        """Follow a newly accepted job (first look after ``watch_seconds``)."""
        await self.due.add(
            record.id, record.id.encode(), self.clock() + self.settings.watch_seconds
        )

    def close(self) -> None:
        """Stop after the current round (see ``Dispatcher.close``: a cancellation can be
        lost inside the Redis client)."""
        self._closing = True
        self._wake.set()

    def poke(self) -> None:
        """Something ended (the live stream says so): look at the due jobs now."""
        self._wake.set()

    async def run(self) -> None:
        lease = max(30.0, self.settings.watch_seconds * 4)
        while not self._closing:
            self._wake.clear()
            now = self.clock()
            claimed = await self.due.claim(now, lease, BATCH)
            for job_id, _, token in claimed:
                await self._check(job_id, token)
            self.metrics.watched.set(await self.due.depth())
            if len(claimed) == BATCH:
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # cancellation that stops this loop when the event is set at the same moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.watch_seconds):
                    await self._wake.wait()

    async def end_seen(self, job_id: str) -> None:
        """The live stream saw ``job_id``'s last event: record its end now if ComfyUI's
        history says so (otherwise the next periodic look will)."""
        record = await self.store.get(job_id)
        if record is None:
            return
        state = await read_state(self.pool, record.upstream, job_id, self.base_path)
        if state.status in TERMINAL:
            await self.ended(record, state)

    async def _check(self, job_id: str, token: str) -> None:
        record = await self.store.get(job_id)
        if record is None:  # expired (or never written): nothing left to tell anyone
            await self.due.finish(job_id, token)
            return
        state = await read_state(self.pool, record.upstream, job_id, self.base_path)
        if state.status in TERMINAL:
            await self.ended(record, state)
            await self.due.finish(job_id, token)
            return
        if self.clock() - record.created_at > self.settings.retention_seconds:
            log.warning("job_watch_expired", job=job_id, status=state.status)
            await self.due.finish(job_id, token)
            return
        next_look = self.clock() + self.settings.watch_seconds
        await self.due.reschedule(job_id, token, next_look, job_id.encode())

    async def ended(self, record: JobRecord, state: JobState) -> None:
        """Record the end of ``record``'s job (idempotent, see the module doc)."""
        now = self.clock()
        if record.webhook and self.dispatcher is not None:
            view = job_view(self.base_path, record.id, record, state)
            message = Message(
                id=signing.new_message_id(),
                job=record.id,
                url=record.webhook,
                body=webhook_payload(view, state.status, now),
                first_at=now,
            )
            if await self.outbox.enqueue_once(message, now):
                log.info("webhook_enqueued", id=message.id, job=record.id, status=state.status)
                self.dispatcher.wake()
        if record.cache_key and record.cache_ttl > 0 and state.status == "succeeded":
            await self.cache.store(record.cache_key, record.id, record.upstream, record.cache_ttl)
        if await self.due.remove(record.id):
            self.metrics.finished.labels(state.status).inc()
            log.info("job_finished", job=record.id, status=state.status, user=record.owner)
        async with self._ended:
            self._recent.append(record.id)
            self._ended.notify_all()

    async def wait_ended(self, job_id: str) -> None:
        """Until this process recorded ``job_id``'s end (tests; a recent one is remembered)."""
        async with self._ended:
            await self._ended.wait_for(lambda: job_id in self._recent)


__all__ = ["JobWatcher", "webhook_payload"]
