"""Prompts of an instance that became unavailable: reported as failed, never silently lost.

ComfyUI keeps its queue in memory: when an instance dies (or is removed) with prompts pending
or running, they are gone. With several instances the proxy:

1. knows what each instance holds: :class:`QueueWatch` reads each instance's unfinished
   prompts every ``upstream.lost_watch_seconds`` (``/api/jobs?status=in_progress,pending``,
   which lists ids without the workflows; ``/queue`` on servers without the jobs API), and
   is also fed by every merged ``/queue`` the proxy fetches anyway and by the fan-in's
   end-of-prompt events;
2. knows which prompts *ended*: a prompt whose end event was relayed, or that left an
   instance's queue between two reads, is marked finished, in Redis when configured so that
   every replica knows what any replica saw (a replica's own snapshot can be two seconds old
   and miss an end another replica relayed);
3. on the pool's ``down`` or ``left`` event for an instance, decides each prompt it held from
   fresh facts, not from that snapshot alone: when the instance still answers, a fresh read
   of its queue (still queued: not lost) and the prompt's ``/history/{id}`` (an entry: it
   finished); when it does not, the finished marks. Only what remains is lost;
4. shares the verdict: the first replica to decide writes it (Redis ``SET NX``, atomic with
   the finished-mark check), later deciders adopt that one, and every replica reads it, so
   ``/history/{id}`` (an entry with status ``error`` and an ``execution_error`` message, as
   ComfyUI shows an execution error), ``/api/jobs/{id}`` (a ``failed`` job, status 200 as
   ComfyUI answers any job it knows) and the merged lists answer the same from every
   replica. The owner's open sockets hear ``execution_error`` then ``executing {node: null}``
   once (each replica tells the sockets it holds, once per prompt; a replica learns others'
   verdicts from a shared index at each watch interval). ``comfygate_prompts_lost_total``
   counts each verdict once, on the replica that made it.

Without Redis all of this is in process memory (one replica). A Redis failure never stops the
watch: the decision is made locally (and shared once Redis answers again), lookups fall back
to the replica's copy, and each failure is logged and counted
(``comfygate_redis_errors_total{op="lost_prompts"}``). Verdicts expire after
``isolation.retention_seconds``. If the instance comes back and did finish a prompt after all,
its real history entry wins (sticky routing asks the instance first).

Resubmitting lost prompts elsewhere is not done: the proxy does not keep prompt bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import redis.asyncio as redis
import structlog
from aiohttp import hdrs

from proxy.errors import UpstreamError
from proxy.observability.metrics import Metrics
from proxy.redis.client import RedisClient
from proxy.tasks import supervise
from proxy.tenancy.ownership import OwnershipStore
from proxy.upstream.encoding import BACKGROUND_LIMIT, IDENTITY, read_client_answer
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.lost")

LOST_EXCEPTION_TYPE = "comfygate.InstanceUnavailable"
MAX_LOST = 10_000
MAX_FINISHED = 100_000
FINISHED_SECONDS = 600.0
"""How long an end is remembered: it only has to outlive the time between a prompt's end and
the detection of its instance's death (seconds)."""
MAX_TOLD = 20_000
HISTORY_CHECKS = 8
"""History reads in flight at once while deciding (an instance rarely holds more than a few)."""
FLUSH_RETRY_SECONDS = 1.0
REDIS_OP = "lost_prompts"
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

    def dumps(self) -> bytes:
        """The shared form (the id is in the key)."""
        return orjson.dumps({"upstream": self.upstream, "lost_at": self.lost_at, "n": self.number})

    @classmethod
    def loads(cls, prompt_id: str, raw: bytes | str) -> LostPrompt | None:
        """A shared verdict; None when it cannot be read (never trusted half-read)."""
        try:
            data = orjson.loads(raw)
            return cls(prompt_id, str(data["upstream"]), float(data["lost_at"]), float(data["n"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

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
    """Lost prompts by id, bounded and expiring (a replica's copy of the shared verdicts)."""

    def __init__(self, retention_seconds: float, *, clock: Callable[[], float] = time.time):
        self._retention = retention_seconds
        self._clock = clock
        self._lost: OrderedDict[str, LostPrompt] = OrderedDict()

    def add(self, lost: LostPrompt) -> bool:
        """Keep ``lost``; False when that prompt was already reported."""
        if self.get(lost.prompt_id) is not None:
            return False
        self.put(lost)
        return True

    def put(self, lost: LostPrompt) -> None:
        """Keep ``lost``, replacing a record of the same prompt (the agreed verdict wins)."""
        self._lost[lost.prompt_id] = lost
        while len(self._lost) > MAX_LOST:
            self._lost.popitem(last=False)

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

    def ids(self) -> set[str]:
        return set(self._lost)

    def all(self) -> list[LostPrompt]:
        """Every live record, oldest first."""
        horizon = self._clock() - self._retention
        for prompt_id in [p for p, lost in self._lost.items() if lost.lost_at < horizon]:
            del self._lost[prompt_id]
        return sorted(self._lost.values(), key=lambda lost: lost.lost_at)

    def __len__(self) -> int:
        return len(self._lost)


class Finished:
    """Prompts known to have ended (relayed end events, queue reads), bounded and expiring."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ended: OrderedDict[str, float] = OrderedDict()

    def add(self, prompt_id: str) -> None:
        self._ended[prompt_id] = self._clock()
        self._ended.move_to_end(prompt_id)
        while len(self._ended) > MAX_FINISHED:
            self._ended.popitem(last=False)

    def __contains__(self, prompt_id: object) -> bool:
        seen = self._ended.get(prompt_id) if isinstance(prompt_id, str) else None
        return seen is not None and seen + FINISHED_SECONDS >= self._clock()


@dataclass(slots=True)
class _Held:
    number: float
    noted_at: float
    """monotonic time the proxy learnt of it (snapshots older than this do not drop it)."""


class QueueWatch:
    """Which unfinished prompts each instance holds, as last seen."""

    def __init__(self) -> None:
        self._held: dict[str, dict[str, _Held]] = {}

    def observe(
        self, upstream: str, items: Iterable[tuple[str, float]], asked_at: float
    ) -> list[str]:
        """A fresh view of ``upstream``'s unfinished ``(prompt_id, number)`` pairs, asked for at
        ``asked_at`` (monotonic): prompts learnt of after that are kept. Returns the prompts
        that were held and have left the queue since (they ended)."""
        previous = self._held.get(upstream, {})
        held = {pid: _Held(number, asked_at) for pid, number in items}
        ended: list[str] = []
        for pid, seen in previous.items():
            if pid in held:
                continue
            if seen.noted_at > asked_at:
                held[pid] = seen
            else:
                ended.append(pid)
        self._held[upstream] = held
        return ended

    def note_submitted(self, upstream: str, prompt_id: str, number: float = 0) -> None:
        self._held.setdefault(upstream, {})[prompt_id] = _Held(number, time.monotonic())

    def note_finished(self, prompt_id: str) -> None:
        for held in self._held.values():
            held.pop(prompt_id, None)

    def take(self, upstream: str) -> dict[str, float]:
        """Forget and return what ``upstream`` held: ``{prompt_id: number}``."""
        return {pid: seen.number for pid, seen in self._held.pop(upstream, {}).items()}

    def put_back(self, upstream: str, held: dict[str, float]) -> None:
        """Hold again what :meth:`take` returned and was not decided (noted now)."""
        now = time.monotonic()
        mine = self._held.setdefault(upstream, {})
        for pid, number in held.items():
            mine.setdefault(pid, _Held(number, now))

    def held(self, upstream: str) -> set[str]:
        return set(self._held.get(upstream, {}))

    def holding(self) -> list[str]:
        """Instances with prompts held."""
        return [name for name, held in self._held.items() if held]


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


# KEYS: the prompt's verdict, its finished mark (one hash slot: ``{<prompt id>}``).
# ARGV: the verdict (JSON), its ttl (s). Returns nil when the prompt is marked finished, else
# {1, verdict} when this call wrote it, {0, verdict} when another replica had.
CLAIM_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return {1, ARGV[1]} end
return {0, redis.call('GET', KEYS[1])}
"""

Claimed = tuple[LostPrompt | None, bool]
"""The agreed verdict (None: the prompt finished) and whether this call made it."""


class SharedVerdicts:
    """Verdicts and finished marks in Redis. Keys: ``<p>{<id>}:v`` (the verdict, JSON),
    ``<p>{<id>}:done`` (finished mark), ``<p>index`` (sorted set of lost ids by time)."""

    def __init__(
        self, client: RedisClient, retention_seconds: float, prefix: str = "comfygate:lost:"
    ) -> None:
        self._redis = client
        self._retention = retention_seconds
        self._prefix = prefix

    def _verdict(self, prompt_id: str) -> str:
        return f"{self._prefix}{{{prompt_id}}}:v"

    def _done(self, prompt_id: str) -> str:
        return f"{self._prefix}{{{prompt_id}}}:done"

    @property
    def _index(self) -> str:
        return f"{self._prefix}index"

    async def claim(self, lost: LostPrompt) -> Claimed:
        ttl = max(1, int(self._retention))
        keys = (self._verdict(lost.prompt_id), self._done(lost.prompt_id))
        reply: Any = await self._redis.eval(CLAIM_LUA, 2, *keys, lost.dumps(), ttl)
        if reply is None:
            return None, False
        made, raw = int(reply[0]), reply[1]
        agreed = LostPrompt.loads(lost.prompt_id, raw) if raw is not None else None
        if made:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self._index, {lost.prompt_id: lost.lost_at})
                pipe.zremrangebyscore(self._index, "-inf", time.time() - self._retention)
                pipe.zremrangebyrank(self._index, 0, -MAX_LOST - 1)
                pipe.expire(self._index, ttl)
                await pipe.execute()
        return agreed or lost, bool(made)

    async def get(self, prompt_id: str) -> LostPrompt | None:
        raw = await self._redis.get(self._verdict(prompt_id))
        return LostPrompt.loads(prompt_id, raw) if raw is not None else None

    async def get_many(self, prompt_ids: Sequence[str]) -> list[LostPrompt]:
        if not prompt_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for prompt_id in prompt_ids:
                pipe.get(self._verdict(prompt_id))
            raws = await pipe.execute()
        found = (
            LostPrompt.loads(pid, raw) if raw is not None else None
            for pid, raw in zip(prompt_ids, raws, strict=True)
        )
        return [lost for lost in found if lost is not None]

    async def listed(self) -> set[str]:
        """The ids of every live verdict (bounded by :data:`MAX_LOST`)."""
        ids = await self._redis.zrangebyscore(
            self._index, time.time() - self._retention, "+inf", start=0, num=MAX_LOST
        )
        return {i.decode() if isinstance(i, bytes) else str(i) for i in ids}

    async def mark_finished(self, prompt_ids: Iterable[str]) -> None:
        ttl = int(FINISHED_SECONDS)
        async with self._redis.pipeline(transaction=False) as pipe:
            for prompt_id in prompt_ids:
                pipe.set(self._done(prompt_id), b"1", ex=ttl)
            await pipe.execute()

    async def forget(self, prompt_ids: Iterable[str]) -> None:
        ids = list(prompt_ids)
        if not ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for prompt_id in ids:
                pipe.delete(self._verdict(prompt_id))
            pipe.zrem(self._index, *ids)
            await pipe.execute()


class LostPrompts:
    """The watch, the verdicts and the reaction to an instance going away (see module doc)."""

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
        redis_client: RedisClient | None = None,
    ) -> None:
        self.pool = pool
        self.ownership = ownership
        self.metrics = metrics
        self.watch = QueueWatch()
        self.store = LostStore(retention_seconds)
        self.finished = Finished()
        self.shared = (
            SharedVerdicts(redis_client, retention_seconds) if redis_client is not None else None
        )
        self._watch_seconds = watch_seconds
        self._timeout = timeout_seconds
        self._notify = notify
        self._no_jobs_api: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._to_mark: set[str] = set()
        """Finished marks not yet written to Redis."""
        self._flush = asyncio.Event()
        self._unshared: set[str] = set()
        """Verdicts made while Redis failed: shared at the next sync."""
        self._told: OrderedDict[str, None] = OrderedDict()
        """Prompts whose error this replica sent to its sockets (each once)."""
        self._started_at = time.time()
        """Verdicts older than this process were told by the replicas of their time."""
        self._flushing = asyncio.Lock()
        self._deciding: dict[str, asyncio.Lock] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._watch_seconds > 0:
            self._tasks.append(self._supervised("lost_watch", self._watch_once))
        if self.shared is not None:
            self._tasks.append(self._supervised("lost_flush", self._flush_once))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.flush()  # what ended before shutdown

    def _supervised(self, name: str, step: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """``step`` forever, supervised (proxy.tasks): a failure of anything it calls is logged
        and counted and the loop restarts with back-off (a background watch that dies silently
        is the failure it exists for)."""

        async def forever() -> None:
            while True:
                await step()

        return asyncio.create_task(
            supervise(forever, name=name, failures=self.metrics.task_failures)
        )

    async def on_pool_event(self, event: str, upstream: Upstream) -> None:
        """``pool.subscribe`` listener."""
        if event in ("down", "left"):
            await self.instance_lost(upstream)

    # -- watching -------------------------------------------------------------------------
    async def _watch_once(self) -> None:
        if len(self.pool.upstreams) > 1:  # one instance: nothing to fail over to
            await asyncio.gather(
                *(self.refresh(u) for u in self.pool.reachable()), return_exceptions=True
            )
            await self._decide_held_elsewhere()
        await self.sync()
        with contextlib.suppress(TimeoutError):
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that comes as
            # the event is set (stopping the watch would then wait forever).
            async with asyncio.timeout(self._watch_seconds):
                await self._wake.wait()
        self._wake.clear()

    async def _decide_held_elsewhere(self) -> None:
        """Prompts still held for an unavailable instance (it answered when it went down, with
        them queued): decided again until they end or are lost."""
        reachable = {u.name for u in self.pool.reachable()}
        for name in self.watch.holding():
            if name not in reachable:
                await self._decide(name, self.pool.get(name))

    async def refresh(self, upstream: Upstream) -> None:
        """Read what ``upstream`` holds now (jobs API first: ids without the workflows)."""
        asked_at = time.monotonic()
        items = await self._read_held(upstream)
        if items is not None:
            self._ended(self.watch.observe(upstream.name, items, asked_at))

    async def _read_held(self, upstream: Upstream) -> list[tuple[str, float]] | None:
        """``upstream``'s unfinished prompts now; None when it did not answer."""
        if upstream.name not in self._no_jobs_api:
            status, body = await self._get(upstream, JOBS_WATCH_PATH)
            if status == 200:
                return job_items(_loads(body))
            if status is None:
                return None
            self._no_jobs_api.add(upstream.name)  # an older ComfyUI: 404
        status, body = await self._get(upstream, "/queue")
        return queue_items(_loads(body)) if status == 200 else None

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
        self._ended(self.watch.observe(upstream.name, queue_items(queue), asked_at))

    def note_finished(self, prompt_id: str) -> None:
        """The fan-in relayed the end of ``prompt_id`` (``FanInRegistry.on_finished``)."""
        self.watch.note_finished(prompt_id)
        self._ended([prompt_id])

    def _ended(self, prompt_ids: Iterable[str]) -> None:
        """Facts for every replica: these prompts ended (written at once, in the background)."""
        for prompt_id in prompt_ids:
            self.finished.add(prompt_id)
            if self.shared is not None and len(self._to_mark) < MAX_FINISHED:
                self._to_mark.add(prompt_id)
                self._flush.set()

    async def _flush_once(self) -> None:
        await self._flush.wait()
        self._flush.clear()
        if not await self.flush():
            await asyncio.sleep(FLUSH_RETRY_SECONDS)  # Redis failed: written when it answers
            self._flush.set()

    async def flush(self) -> bool:
        """Write the finished marks not yet shared; False when Redis failed (kept for later)."""
        async with self._flushing:
            batch, self._to_mark = self._to_mark, set()
            if not batch or self.shared is None:
                return True
            try:
                await self.shared.mark_finished(batch)
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._redis_failed("mark_finished", exc)
                self._to_mark |= batch  # bounded by _ended
                return False
            return True

    # -- an instance went away -------------------------------------------------------------
    async def instance_lost(self, upstream: Upstream) -> list[LostPrompt]:
        """Decide every prompt ``upstream`` held (see the module doc); report the lost ones
        (idempotent per prompt). Returns the verdicts this call reached."""
        return await self._decide(upstream.name, self.pool.get(upstream.name))

    async def _decide(self, name: str, upstream: Upstream | None) -> list[LostPrompt]:
        """``upstream``: the instance if still in the pool (asked first); None when it left
        (what it still runs can no longer be reached through the proxy: lost)."""
        lock = self._deciding.setdefault(name, asyncio.Lock())
        async with lock:  # a down event and the watch's retry never decide one prompt twice
            held = self.watch.take(name)
            if not held:
                return []
            held = {p: n for p, n in held.items() if p not in self.finished}
            undecided = await self._still_there(upstream, held) if upstream is not None else {}
            if undecided:
                self.watch.put_back(name, undecided)
            now = time.time()
            reported: list[LostPrompt] = []
            for prompt_id, number in held.items():
                if prompt_id in undecided:
                    continue
                lost = await self._claim(LostPrompt(prompt_id, name, now, number))
                if lost is not None:
                    reported.append(lost)
            return reported

    async def _still_there(self, upstream: Upstream, held: dict[str, float]) -> dict[str, float]:
        """Ask the instance itself, if it answers: the prompts it still holds (not lost, kept
        held), and each other one's history (an entry: it finished). Returns what stays
        undecided; the prompts found finished are marked so."""
        if not held:
            return {}
        queued = await self._read_held(upstream)
        if queued is None:
            return {}  # it does not answer: the finished marks decide
        still = {pid for pid, _ in queued}
        undecided = {p: n for p, n in held.items() if p in still}
        gate = asyncio.Semaphore(HISTORY_CHECKS)

        async def history(prompt_id: str) -> tuple[str, int | None, object]:
            async with gate:
                status, body = await self._get(upstream, f"/history/{prompt_id}")
            return prompt_id, status, _loads(body)

        checked = await asyncio.gather(*(history(p) for p in held if p not in still))
        ended = []
        for prompt_id, status, found in checked:
            if status != 200:
                undecided[prompt_id] = held[prompt_id]  # no answer: asked again later
            elif isinstance(found, dict) and found.get(prompt_id):
                ended.append(prompt_id)
        self._ended(ended)
        return undecided

    async def _claim(self, candidate: LostPrompt) -> LostPrompt | None:
        """The agreed verdict on ``candidate`` (None: it finished); counted where it was made,
        told to this replica's sockets once."""
        if candidate.prompt_id in self.finished:
            return None
        lost: LostPrompt | None = candidate
        made = True
        if self.shared is not None:
            try:
                lost, made = await self.shared.claim(candidate)
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._redis_failed("claim", exc)
                self._unshared.add(candidate.prompt_id)
                lost, made = candidate, self.store.get(candidate.prompt_id) is None
            if lost is None:
                self.finished.add(candidate.prompt_id)
                return None
            self.store.put(lost)
        elif not self.store.add(candidate):
            lost, made = self.store.get(candidate.prompt_id), False
        if lost is None:
            return None
        if made:
            self.metrics.prompts_lost.labels(lost.upstream).inc()
        await self._tell(lost, decided=made)
        return lost

    async def _tell(self, lost: LostPrompt, *, decided: bool) -> None:
        """The owner's sockets on this replica hear the error, once."""
        if lost.prompt_id in self._told:
            return
        self._told[lost.prompt_id] = None
        while len(self._told) > MAX_TOLD:
            self._told.popitem(last=False)
        told = 0
        try:
            record = await self.ownership.prompt(lost.prompt_id)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._redis_failed("owner", exc)
            record = None
        if record is not None and record.client_id:
            told = await self._notify(record.client_id, lost.frames())
        log.warning(
            "prompt_lost",
            prompt_id=lost.prompt_id,
            upstream=lost.upstream,
            owner_sockets=told,
            decided_here=decided,
        )

    # -- what every replica answers ---------------------------------------------------------
    async def verdict(self, prompt_id: str) -> LostPrompt | None:
        """The agreed verdict on ``prompt_id`` (None: not lost); this replica's copy when
        Redis does not answer."""
        if self.shared is None or prompt_id in self._unshared:
            return self.store.get(prompt_id)
        try:
            lost = await self.shared.get(prompt_id)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._redis_failed("get", exc)
            return self.store.get(prompt_id)
        if lost is None:
            self.store.discard(prompt_id)
        else:
            self.store.put(lost)
        return lost

    def lost(self, prompt_id: str) -> LostPrompt | None:
        """This replica's copy (synced every watch interval); :meth:`verdict` asks Redis."""
        return self.store.get(prompt_id)

    async def forget(self, prompt_ids: Iterable[str]) -> None:
        """Their history entries were deleted: no replica answers them any more."""
        ids = list(prompt_ids)
        for prompt_id in ids:
            self.store.discard(prompt_id)
            self._unshared.discard(prompt_id)
        if self.shared is not None and ids:
            try:
                await self.shared.forget(ids)
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._redis_failed("forget", exc)

    async def forget_all(self) -> None:
        """History cleared (an admin's ``clear``)."""
        ids = self.store.ids()
        if self.shared is not None:
            try:
                ids |= await self.shared.listed()
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._redis_failed("forget", exc)
        self.store.clear()
        await self.forget(ids)

    async def sync(self) -> None:
        """This replica's copy follows the shared verdicts: new ones are kept (and told to the
        owner's sockets here, unless decided before this process started), deleted ones
        dropped; verdicts made while Redis failed are shared."""
        if self.shared is None:
            return
        before = self.store.ids()  # verdicts added while this reads are kept
        try:
            for prompt_id in list(self._unshared):
                local = self.store.get(prompt_id)
                self._unshared.discard(prompt_id)
                if local is not None:
                    agreed, _ = await self.shared.claim(local)
                    if agreed is None:  # it had finished after all: an end was marked
                        self.store.discard(prompt_id)
                    else:
                        self.store.put(agreed)
            listed = await self.shared.listed()
            new = [p for p in listed if self.store.get(p) is None]
            fetched = await self.shared.get_many(new)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._redis_failed("sync", exc)
            return
        for prompt_id in before - listed - self._unshared:
            self.store.discard(prompt_id)
        for lost in fetched:
            self.store.put(lost)
            if lost.lost_at >= self._started_at:
                await self._tell(lost, decided=False)

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        kind = "timeout" if isinstance(exc, TimeoutError | redis.TimeoutError) else "error"
        self.metrics.redis_errors.labels(REDIS_OP, kind).inc()
        log.warning("lost_prompts_redis_failed", operation=what, error=repr(exc))


def _loads(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


__all__ = [
    "LOST_EXCEPTION_TYPE",
    "Finished",
    "LostPrompt",
    "LostPrompts",
    "LostStore",
    "QueueWatch",
    "SharedVerdicts",
    "job_items",
    "queue_items",
]
