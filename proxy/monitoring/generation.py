"""Generation metrics: prompts submitted and finished (by role and outcome), queue wait and
execution time.

Sources, each prompt counted once whichever of them (and whichever worker or replica) sees it:

* ``POST /prompt`` answered 200 (``Metrics.request_finished`` -> :meth:`GenerationTracker.
  submitted`): the submitter's role, and the submission time on the proxy's clock (isolation's
  ownership record has it earlier: it is written before the prompt is forwarded).
* The WebSocket relay (:meth:`GenerationTracker.observe_frame`): ``execution_start`` (queue
  wait = now - submission), ``execution_success`` / ``_error`` / ``_interrupted`` (outcome;
  execution time from ComfyUI's own ``timestamp`` of start and end, one clock).
* A prompt that left ComfyUI's queue without a relay seeing its end (an API client polling
  ``/history``): :meth:`GenerationTracker.prompt_left_queue` reads that one ``/history/{id}``
  entry, whose ``status.messages`` carry the same events with their timestamps. No entry:
  ``cancelled`` (deleted from the queue, or lost with a restarted ComfyUI). Who notices:
  the tracker's own *end watch* for every prompt this process submitted (admins' and other
  unquota'd prompts included: the queue-quota reconciler only sees counted ones) - every
  ``[metrics] upstream_poll_seconds`` (0 = no background reads: off, like the upstream probe),
  while it watches any, it reads the ``GET /queue`` of the instances they were accepted on, and
  a prompt no longer listed has ended - and the queue-quota reconciler, whichever is first.
  The watch forgets a prompt as soon as its end is counted here (a relay's event included), so
  a prompt with a socket costs no queue read after its end, and no history read either when
  the reconciler reports it later (:data:`ENDED_HERE` ends remembered). Prompts noticed in
  the same turn on one instance are read together: one ``GET /history?max_items=N`` (the
  newest entries, where prompts that just ended are) instead of one ``/history/{id}`` each;
  an id that answer lacks is read alone, as before (issue 17: a history read per finished
  prompt was 13 % of the proxy's CPU on ``POST /prompt``).

"Once" is a per-prompt record with first-writer-wins fields (``HSETNX`` in Redis when
configured, shared by workers and replicas; a bounded dict otherwise). With isolation on, a
submission writes nothing to it: isolation's ownership record, written before forwarding, has
the role and submission time already, and a Redis write per ``POST /prompt`` for the same facts
was a measurable share of the proxy's submission cost; the record then starts with the first
stage claimed (a start or an end). Everything here runs
in background tasks: a frame is never held back by a Redis round trip, and a Redis failure
costs accuracy (possible double counts), never a request.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, Final, Protocol

import aiohttp
import orjson
import redis.asyncio as redis
import structlog
from aiohttp import hdrs, web

from proxy.comfy.records import PromptRecord
from proxy.errors import UpstreamError
from proxy.gc_tuning import collector_paused
from proxy.observability.metrics import METRICS, Metrics, role_label
from proxy.periodic import Periodic
from proxy.redis.client import REDIS
from proxy.settings import SETTINGS
from proxy.tenancy.ownership import OWNERSHIP, OwnershipStore
from proxy.upstream.encoding import BACKGROUND_LIMIT, IDENTITY, read_client_answer
from proxy.upstream.pool import POOL, UpstreamPool
from proxy.upstream.queue_read import queued_ids

log = structlog.get_logger("comfygate.metrics")

OUTCOMES: Final = {
    "execution_success": "completed",
    "execution_error": "failed",
    "execution_interrupted": "interrupted",
}
START: Final = "execution_start"
_MARKER: Final = '"execution_'
"""Cheap pre-check on a text frame before it is parsed (most frames are progress)."""
RECORD_TTL_SECONDS: Final = 2 * 24 * 3600
MAX_LOCAL_RECORDS: Final = 50_000
REDIS_TIMEOUT_SECONDS: Final = 0.25
REDIS_OP: Final = "generation"
HISTORY_TIMEOUT_SECONDS: Final = 5.0
UNKNOWN_ROLE: Final = "unknown"
MAX_WATCHED: Final = 50_000
"""Prompts whose end the watch waits for, per process (oldest given up first)."""
WATCH_MAX_AGE_SECONDS: Final = 24 * 3600.0
"""A prompt still queued (or on an unreachable instance) this long is no longer watched."""
ENDED_HERE: Final = 4096
"""Prompt ends counted (or found counted) by this process, remembered to skip a history read."""
HISTORY_BATCH_MAX: Final = 64
"""Most prompts read with one ``/history?max_items`` (more are read in several)."""
HISTORY_BATCH_SLACK: Final = 8
"""Entries read beyond the batch: prompts of others that ended meanwhile come first."""


class PromptStats(Protocol):
    """One small record per prompt: ``role``, ``submitted`` (proxy clock), ``started``
    (ComfyUI's ms timestamp), ``ended``; fields are written once."""

    async def submitted(self, prompt_id: str, role: str, at: float) -> None: ...

    async def claim(self, prompt_id: str, field: str, value: str) -> dict[str, str] | None:
        """Set ``field`` if it is not set yet and return the record; None if it was set
        (someone else counted this stage)."""
        ...


class MemoryPromptStats:
    """One process (no Redis): a bounded dict, oldest prompts forgotten first."""

    def __init__(self, max_records: int = MAX_LOCAL_RECORDS) -> None:
        self._records: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._max = max_records

    def _record(self, prompt_id: str) -> dict[str, str]:
        record = self._records.get(prompt_id)
        if record is None:
            record = self._records[prompt_id] = {}
            while len(self._records) > self._max:
                self._records.popitem(last=False)
        return record

    async def submitted(self, prompt_id: str, role: str, at: float) -> None:
        self.note_submitted(prompt_id, role, at)

    def note_submitted(self, prompt_id: str, role: str, at: float) -> None:
        """:meth:`submitted`, synchronously (a dict write)."""
        record = self._record(prompt_id)
        record.setdefault("role", role)
        record.setdefault("submitted", repr(at))

    def peek(self, prompt_id: str) -> dict[str, str] | None:
        """The record as it is, unchanged (None: unknown)."""
        return self._records.get(prompt_id)

    async def claim(self, prompt_id: str, field: str, value: str) -> dict[str, str] | None:
        record = self._record(prompt_id)
        if field in record:
            return None
        record[field] = value
        return dict(record)


class RedisPromptStats:
    """Shared by workers and replicas: a hash ``<prefix><prompt id>`` per prompt."""

    def __init__(
        self, client: Any, prefix: str = "comfygate:gen:", ttl: int = RECORD_TTL_SECONDS
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl = ttl

    async def submitted(self, prompt_id: str, role: str, at: float) -> None:
        key = self._prefix + prompt_id
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(key, "role", role)
            pipe.hsetnx(key, "submitted", repr(at))
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def claim(self, prompt_id: str, field: str, value: str) -> dict[str, str] | None:
        key = self._prefix + prompt_id
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(key, field, value)
            pipe.hgetall(key)
            pipe.expire(key, self._ttl)
            first, record, _ = await pipe.execute()
        if not first:
            return None
        return {_text(k): _text(v) for k, v in record.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class GenerationTracker:
    """Counts prompts from submissions, relayed events and history (see the module doc)."""

    def __init__(
        self,
        metrics: Metrics,
        stats: PromptStats,
        *,
        pool: UpstreamPool | None = None,
        ownership: OwnershipStore | None = None,
        fallback: MemoryPromptStats | None = None,
        owned_submissions: bool = False,
    ) -> None:
        self._metrics = metrics
        self._stats = stats
        self._ownership = ownership
        """Prompt records of isolation, written *before* forwarding: ComfyUI may start a
        prompt before its answer reaches the proxy (and this tracker's own record)."""
        self._fallback = fallback or MemoryPromptStats()
        """Used while the shared store fails (then a prompt may be counted twice)."""
        self._owned_submissions = owned_submissions and ownership is not None
        """Isolation records every submission (role, time) before it is forwarded: no record
        of this tracker's own is written for it (kept in this process's dict only, a fallback
        for a prompt whose ownership record cannot be read)."""
        self._pool = pool
        self._tasks: set[asyncio.Task[None]] = set()
        self._watched: OrderedDict[str, tuple[str, float]] = OrderedDict()
        """Prompts this process submitted whose end is not counted here yet: id -> (instance
        that accepted it, submission time); the end watch's work list."""
        self._watch_lock = asyncio.Lock()
        self._starting: dict[str, asyncio.Task[None]] = {}
        """Start claims in flight, by prompt id (an end waits for its start's)."""
        self.watch_rounds = 0
        """Completed end-watch rounds (diagnostics)."""
        self._ended_here: OrderedDict[str, None] = OrderedDict()
        """Prompts whose end is counted (here or, as a claim told, elsewhere)."""
        self._left: dict[str, list[str]] = {}
        """Prompts noticed to have left an instance's queue this turn, read together."""

    # -- entry points (synchronous: they only schedule) ------------------------------------
    def submitted(self, prompt_id: str | None, roles: frozenset[str], upstream: str) -> None:
        """ComfyUI accepted a prompt (counted at once; its record written in the background)."""
        role = role_label(roles)
        self._metrics.prompts_submitted.labels(role).inc()
        if prompt_id:
            now = time.time()
            self._watch(prompt_id, upstream, now)
            if self._owned_submissions:
                self._fallback.note_submitted(prompt_id, role, now)
            else:
                self._spawn(self._store("submitted", prompt_id, role, now))

    def observe_frame(self, frame: str, roles: frozenset[str], upstream: str) -> None:
        """A text frame ComfyUI sent on a relayed socket (before the tenant filter)."""
        if _MARKER not in frame:
            return
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        kind, data = message.get("type"), message.get("data")
        if not isinstance(data, dict) or not isinstance(prompt_id := data.get("prompt_id"), str):
            return
        timestamp = data.get("timestamp")
        ts = float(timestamp) if isinstance(timestamp, int | float) else None
        if kind == START:
            task = self._spawn(self._started(prompt_id, ts, time.time(), upstream, roles))
            self._starting[prompt_id] = task
            task.add_done_callback(lambda _: self._starting.pop(prompt_id, None))
        elif isinstance(kind, str) and kind in OUTCOMES:
            # After the start's claim: the execution time is read from the record it writes
            # (two background round trips to Redis need not complete in order).
            starting = self._starting.get(prompt_id)
            ended = self._ended(prompt_id, OUTCOMES[kind], ts, upstream, roles)
            self._spawn(ended if starting is None else _after(starting, ended))

    def prompt_left_queue(self, prompt_id: str, upstream: str) -> None:
        """``prompt_id`` is no longer in ``upstream``'s queue; count its end from ComfyUI's
        history unless a relay already did."""
        self._watched.pop(prompt_id, None)  # noticed: the watch need not read it again
        if prompt_id in self._ended_here:
            return  # counted already (a relay's event): nothing to read
        batch = self._left.get(upstream)
        if batch is None:
            # Runs once the caller yields: prompts noticed in the same turn join this batch.
            batch = self._left[upstream] = []
            self._spawn(self._from_history_batch(upstream))
        if prompt_id not in batch:
            batch.append(prompt_id)

    # -- the end watch ---------------------------------------------------------------------
    def _watch(self, prompt_id: str, upstream: str, at: float) -> None:
        self._watched[prompt_id] = (upstream, at)
        self._watched.move_to_end(prompt_id)
        while len(self._watched) > MAX_WATCHED:
            given_up, _ = self._watched.popitem(last=False)
            log.warning("generation_watch_full", prompt_id=given_up)

    @property
    def watched(self) -> int:
        """Prompts whose end the watch still waits for."""
        return len(self._watched)

    async def watch_once(self) -> int:
        """One round of the end watch: read the queue of each instance with watched prompts
        and hand the ones it no longer lists to :meth:`prompt_left_queue`; how many.

        The prompts are taken *before* the queues are read: each was accepted (its 200 seen)
        before it was watched, so a queue read after that lists it unless it has ended.
        """
        async with self._watch_lock:
            ended = await self._watch_round()
            self.watch_rounds += 1
        return ended

    async def _watch_round(self) -> int:
        if not self._watched or self._pool is None:
            return 0
        now = time.time()
        by_upstream: dict[str, list[str]] = {}
        for prompt_id, (upstream, at) in list(self._watched.items()):
            if now - at > WATCH_MAX_AGE_SECONDS:
                del self._watched[prompt_id]  # an end we will not see: given up, uncounted
                continue
            by_upstream.setdefault(upstream, []).append(prompt_id)
        instances = {u.name: u for u in self._pool.upstreams}
        names = [n for n in by_upstream if n in instances]
        queues = await asyncio.gather(
            *(queued_ids(self._pool, instances[n], reader="generation") for n in names)
        )
        ended = 0
        for name, live in zip(names, queues, strict=True):
            if live is None:
                continue  # unreadable now: the next round asks again
            for prompt_id in by_upstream[name]:
                if prompt_id not in live and prompt_id in self._watched:
                    self.prompt_left_queue(prompt_id, name)
                    ended += 1
        return ended

    # -- stages ----------------------------------------------------------------------------
    async def _started(
        self,
        prompt_id: str,
        ts: float | None,
        now: float,
        upstream: str,
        roles: frozenset[str],
    ) -> None:
        record = await self._claim(prompt_id, "started", repr(ts if ts is not None else -1.0))
        if record is None:
            return
        submitted = await self._submitted_at(prompt_id, record)
        if submitted is not None:
            self._metrics.prompt_queue_wait.labels(upstream).observe(max(0.0, now - submitted))

    async def _ended(
        self,
        prompt_id: str,
        outcome: str,
        ts: float | None,
        upstream: str,
        roles: frozenset[str] | None,
        *,
        started: float | None = None,
    ) -> None:
        self._watched.pop(prompt_id, None)  # its end is counted (here or elsewhere)
        record = await self._claim(prompt_id, "ended", outcome)
        self._ended_here[prompt_id] = None
        while len(self._ended_here) > ENDED_HERE:
            self._ended_here.popitem(last=False)
        if record is None:
            return
        role = record.get("role") or await self._submitter_role(prompt_id)
        if not role:
            role = role_label(roles) if roles is not None else UNKNOWN_ROLE
        self._metrics.prompts_finished.labels(role, outcome).inc()
        start = started if started is not None else _number(record.get("started"))
        if start is not None and start >= 0 and ts is not None and ts >= start:
            self._metrics.prompt_execution.labels(upstream).observe((ts - start) / 1000)

    async def _from_history_batch(self, upstream: str) -> None:
        """The prompts noticed together on ``upstream``: one read of the newest entries; any
        it lacks (older, or gone: cancelled) is read alone."""
        ids = self._left.pop(upstream, [])
        while ids:
            chunk, ids = ids[:HISTORY_BATCH_MAX], ids[HISTORY_BATCH_MAX:]
            if len(chunk) == 1:
                await self._from_history(chunk[0], upstream)
                continue
            entries = await self._read_history(
                upstream, f"/history?max_items={len(chunk) + HISTORY_BATCH_SLACK}", chunk
            )
            for prompt_id in chunk:
                entry = entries.get(prompt_id) if entries is not None else None
                if entry is not None:
                    await self._count_history(prompt_id, entry, upstream)
                else:
                    await self._from_history(prompt_id, upstream)

    async def _read_history(
        self, upstream: str, path: str, ids: Sequence[str]
    ) -> dict[str, dict[str, Any]] | None:
        """The entries of ``ids`` in ComfyUI's answer to ``GET path`` on ``upstream`` (those it
        has); None when it cannot be had (the end stays uncounted; never worth a retry storm).

        The answer holds every entry's whole graph: it is parsed with the collector paused and
        only the wanted entries are kept (``proxy.gc_tuning.collector_paused``)."""
        if self._pool is None:
            return None
        target = next((u for u in self._pool.upstreams if u.name == upstream), None)
        if target is None:
            return None
        try:
            async with self._pool.session.get(
                target.url_for(path),
                headers={
                    hdrs.HOST: target.host_header,
                    hdrs.ACCEPT: "application/json",
                    hdrs.ACCEPT_ENCODING: IDENTITY,
                },
                timeout=aiohttp.ClientTimeout(total=HISTORY_TIMEOUT_SECONDS),
            ) as resp:
                if resp.status != 200:
                    return None
                raw = await read_client_answer(
                    resp, limit=BACKGROUND_LIMIT, upstream=target.name, metrics=self._metrics
                )
                with collector_paused():
                    body = orjson.loads(raw)
                    kept = {}
                    if isinstance(body, dict):
                        kept = {i: e for i in ids if isinstance(e := body.get(i), dict)}
                    del body  # the rest freed before the collector is back
                return kept
        except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError, UpstreamError):
            return None

    async def _from_history(self, prompt_id: str, upstream: str) -> None:
        entries = await self._read_history(upstream, f"/history/{prompt_id}", (prompt_id,))
        if entries is None:
            return  # unreadable: the end stays uncounted
        entry = entries.get(prompt_id)
        if entry is None:
            await self._ended(prompt_id, "cancelled", None, upstream, None)
            return
        await self._count_history(prompt_id, entry, upstream)

    async def _count_history(self, prompt_id: str, entry: dict[str, Any], upstream: str) -> None:
        outcome, start, end = history_outcome(entry)
        if start is not None:
            # Not seen on a relay either: the wait as ComfyUI's clock tells it.
            record = await self._claim(prompt_id, "started", repr(start))
            submitted = await self._submitted_at(prompt_id, record) if record else None
            if submitted is not None:
                wait = max(0.0, start / 1000 - submitted)
                self._metrics.prompt_queue_wait.labels(upstream).observe(wait)
        await self._ended(prompt_id, outcome, end, upstream, None, started=start)

    # -- plumbing --------------------------------------------------------------------------
    async def _owned(self, prompt_id: str) -> PromptRecord | None:
        """Isolation's record of ``prompt_id`` (None: none, or unreadable now)."""
        if self._ownership is None:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                return await self._ownership.prompt(prompt_id)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None

    def _local(self, prompt_id: str, field: str) -> str | None:
        """``field`` of the submission as this process noted it (owned submissions only)."""
        record = self._fallback.peek(prompt_id) if self._owned_submissions else None
        return record.get(field) if record is not None else None

    async def _submitter_role(self, prompt_id: str) -> str | None:
        if not self._owned_submissions:
            return None  # the shared record has the role (written on submission)
        owned = await self._owned(prompt_id)
        return (owned.role if owned is not None else "") or self._local(prompt_id, "role")

    async def _submitted_at(self, prompt_id: str, record: Mapping[str, str]) -> float | None:
        owned = await self._owned(prompt_id)
        if owned is not None:
            return owned.created_at
        return _number(record.get("submitted") or self._local(prompt_id, "submitted"))

    async def _store(self, what: str, prompt_id: str, role: str, at: float) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                await self._stats.submitted(prompt_id, role, at)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            await self._fallback.submitted(prompt_id, role, at)
        else:
            self._timed(started)

    async def _claim(self, prompt_id: str, field: str, value: str) -> dict[str, str] | None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                record = await self._stats.claim(prompt_id, field, value)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return await self._fallback.claim(prompt_id, field, value)
        self._timed(started)
        return record

    def _timed(self, started: float) -> None:
        if isinstance(self._stats, RedisPromptStats):
            self._metrics.redis_duration.labels(REDIS_OP).observe(time.perf_counter() - started)

    def _failed(self, exc: BaseException) -> None:
        kind = "timeout" if isinstance(exc, TimeoutError | redis.TimeoutError) else "error"
        self._metrics.redis_errors.labels(REDIS_OP, kind).inc()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("generation_metrics_failed", error=type(exc).__name__, exc_info=exc)
            self._metrics.task_failures.labels("generation_metrics").inc()

    async def drain(self) -> None:
        """Wait for the scheduled work (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def _after(first: asyncio.Task[None], then: Coroutine[Any, Any, None]) -> None:
    """``then`` once ``first`` is over (whatever its outcome: it logs its own failure)."""
    await asyncio.wait([first])
    await then


def history_outcome(entry: Mapping[str, Any]) -> tuple[str, float | None, float | None]:
    """``(outcome, start ms, end ms)`` of a ComfyUI history entry (``status.messages``)."""
    status = entry.get("status")
    messages = status.get("messages") if isinstance(status, dict) else None
    start = end = None
    outcome = ""
    for item in messages if isinstance(messages, list) else ():
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict)):
            continue
        event, data = item
        ts = _number(data.get("timestamp"))
        if event == START:
            start = ts
        elif event in OUTCOMES:
            outcome, end = OUTCOMES[event], ts
    if not outcome:
        status_str = status.get("status_str") if isinstance(status, dict) else None
        outcome = "failed" if status_str == "error" else "completed"
    return outcome, start, end


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


GENERATION = web.AppKey("comfygate.generation", GenerationTracker)


async def generation_tracker(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` (after Redis and the pool): ``app[GENERATION]``."""

    client = app[REDIS]
    stats: PromptStats = RedisPromptStats(client) if client is not None else MemoryPromptStats()
    tracker = GenerationTracker(
        app[METRICS],
        stats,
        pool=app[POOL],
        ownership=app.get(OWNERSHIP),
        # With isolation on, SubmitGuard records every prompt (with its role) before forwarding.
        owned_submissions=app[SETTINGS].isolation.enabled,
    )
    app[GENERATION] = tracker
    app[METRICS].generation = tracker
    # The watch period itself, not a synchronisation (tests call watch_once). 0: the operator
    # wants no background reads of ComfyUI for metrics (as for the upstream probe).
    interval = app[SETTINGS].metrics.upstream_poll_seconds
    watch = Periodic(
        tracker.watch_once,
        interval,
        name="generation-watch",
        log=log,
        event="generation_watch_failed",
        failures=app[METRICS].task_failures,
        jitter=0.1,
    )
    if interval > 0:
        watch.start()
    yield
    await watch.stop()
    await tracker.close()
