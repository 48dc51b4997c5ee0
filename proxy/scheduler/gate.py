"""``Gate``: the gateway queue's feeder, one per proxy process.

Every ``scheduler.poll_interval_ms`` (and at once when a prompt is held or a run ends, here
or on another replica: :mod:`proxy.scheduler.wakeup`), for each
instance this replica holds the *feed lease* of (``P:feed:<instance>``: one feeder per
instance across replicas), the gate:

1. reads the instance's ``GET /queue`` (running and pending ids);
2. ends the prompts it released there that ComfyUI no longer lists (their run time feeds the
   estimates and the fairness index), and recovers lapsed release leases (a replica died
   mid-release: see :mod:`proxy.scheduler.store`);
3. fills the instance's room (``max_running + max_pending`` minus what it lists) with the
   prompts :func:`proxy.scheduler.fair.pick` chooses, claimed then POSTed one by one;
4. with ``pull_back``, when the instance is full and the best held prompt comes before the
   pending one this gate released there, takes that one back (``POST /queue`` delete) so the
   better one starts as soon as the running prompt ends.

A release is the body the guards decided on, sent as is: its ``prompt_id`` (set by the proxy)
makes every retry idempotent from the queue's point of view (a prompt ComfyUI lists or has in
its history is never sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import aiohttp
import orjson
import structlog
from aiohttp import hdrs
from redis.exceptions import RedisClusterException, RedisError

from proxy.comfy.views import queue_ids
from proxy.limits.quota.move import move_reservation
from proxy.limits.quota.service import QueueQuota
from proxy.redis.client import RedisClient
from proxy.scheduler.estimates import Estimates
from proxy.scheduler.fair import Choice, expected_wait, pick, should_pull_back, virtual_time
from proxy.scheduler.metrics import SchedulerMetrics
from proxy.scheduler.notify import Notifier, execution_error, failed_entry
from proxy.scheduler.store import Entry, Flight, SchedulerStore, View
from proxy.scheduler.wakeup import Wakeups
from proxy.settings.scheduler import SchedulerSettings
from proxy.tasks import cancel_and_wait, task_failed, wait_event
from proxy.tenancy.ownership import OwnershipStore
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.scheduler")

PER_USER = 16
"""Held prompts read per user for a choice (the first one an instance can run is the head)."""
CLAIM_ATTEMPTS = 5
"""Choices retried when another replica claimed first (or changed the owner's tag)."""
SEND_TIMEOUT_SECONDS = 30.0
STORE_ERRORS = (RedisError, RedisClusterException, OSError)


@dataclass(frozen=True)
class Admission:
    """A submission held (:meth:`Gate.admit`)."""

    wait: float
    """Seconds until it is expected to start."""
    now: bool
    """Claimed for release by its own request (ComfyUI has room, nothing waits before it)."""


class Gate:
    """See the module doc."""

    def __init__(
        self,
        settings: SchedulerSettings,
        store: SchedulerStore,
        pool: UpstreamPool,
        metrics: SchedulerMetrics,
        *,
        ownership: OwnershipStore | None = None,
        quota: QueueQuota | None = None,
        redis: RedisClient | None = None,
        replica: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.ownership = ownership
        self.quota = quota
        self.redis = redis
        self.replica = replica or uuid.uuid4().hex
        self.estimates = Estimates(settings.default_cost_seconds)
        self.capacity = settings.max_running + settings.max_pending
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started: dict[str, float] = {}
        """When this gate first saw each released prompt running (monotonic)."""
        self._released_at: dict[str, float] = {}
        self._pulling: set[str] = set()
        """Released prompts this gate is taking back from ComfyUI (:meth:`_maybe_pull_back`)."""
        self._room = asyncio.Lock()
        """One count of the instances' room at a time in this process: the feeder's rounds
        and the submissions (:meth:`admit`)."""
        self.ticks = 0
        self._tick_done = asyncio.Condition()
        self._stopping = False
        self.notifier: Notifier | None = None
        """Set by the app: frames to owners' sockets (``proxy.scheduler.notify``)."""
        self.wakeups: Wakeups | None = None
        """With Redis: wake-ups to and from the other replicas (``proxy.scheduler.wakeup``)."""

    # -- lifetime --------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")
        if self.wakeups is not None:
            self.wakeups.start()

    async def stop(self) -> None:
        if self.wakeups is not None:
            await self.wakeups.stop()
        task = self._task
        if task is not None:
            # The flag as well as the cancellation: a cancellation that lands inside a round
            # can be swallowed by a client library (the task stays "cancelling" and goes on
            # polling: the shutdown waited forever); the loop ends at its next check.
            self._stopping = True
            self._wake.set()
            await cancel_and_wait(task)
            self._task = None
        for upstream in self.instances():  # another replica feeds them from its next round
            with contextlib.suppress(*STORE_ERRORS):
                await self.store.drop_feed_lease(upstream.name, self.replica)

    def wake(self) -> None:
        """A round of this feeder now."""
        self._wake.set()

    async def announce(self) -> None:
        """A round now here and on every replica (a prompt was held: the replica feeding its
        instance may be another one)."""
        self.wake()
        if self.wakeups is not None:
            await self.wakeups.publish()

    async def wait_ticks(self, count: int) -> None:
        """Until ``count`` more rounds have run (tests)."""
        target = self.ticks + count
        async with self._tick_done:
            await self._tick_done.wait_for(lambda: self.ticks >= target)

    async def _run(self) -> None:
        interval = self.settings.poll_interval_ms / 1000
        store_down = False
        with contextlib.suppress(*STORE_ERRORS):
            self.estimates.merge(await self.store.estimates())
        while not self._stopping:
            await wait_event(self._wake, interval)  # not wait_for: it can swallow stop()'s cancel
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.tick()
            except STORE_ERRORS as exc:
                # Held prompts stay in the store; the next round tries again.
                store_down = True
                self.metrics.unavailable.labels("feed").inc()
                log.warning("scheduler_store_unavailable", error=type(exc).__name__)
            except Exception:  # noqa: BLE001 - the feeder must outlive any one round
                failures = self.pool.metrics.task_failures if self.pool.metrics else None
                task_failed("scheduler", failures, logger=log, event="scheduler_round_failed")
            else:
                if store_down and self.wakeups is not None:
                    self.wakeups.retry()  # Redis is back: so may the wake-ups be
                store_down = False
            async with self._tick_done:
                self.ticks += 1
                self._tick_done.notify_all()

    # -- one round -------------------------------------------------------------------------
    def instances(self) -> list[Upstream]:
        if not self.pool.managed:
            return [self.pool.home()] if self.pool.upstreams else []
        return self.pool.routable()

    async def tick(self) -> None:
        view = await self.store.view(PER_USER)
        self._depth(view)
        if not view.queues and not view.flights:
            return
        lease = max(self.settings.lease_seconds, 3 * self.settings.poll_interval_ms / 1000)
        for upstream in self.instances():
            if await self.store.feed_lease(upstream.name, self.replica, lease):
                await self.feed(upstream)

    def _depth(self, view: View) -> None:
        by_role: dict[str, int] = {}
        for items in view.queues.values():
            for held in items:
                by_role[held.role] = by_role.get(held.role, 0) + 1
        self.metrics.set_depth(by_role)

    async def feed(self, upstream: Upstream) -> None:
        async with self._room:
            await self._feed(upstream)

    async def _feed(self, upstream: Upstream) -> None:
        read_at = time.time()
        listed = await read_queue(self.pool, upstream)
        if listed is None:
            return  # unreadable: nothing is decided on a guess
        running, pending = listed
        if self.notifier is not None and len(self.instances()) == 1:
            self.notifier.comfy_remaining = len(running) + len(pending)
        name = upstream.name
        view = await self.store.view(PER_USER)
        now = time.time()
        busy = len(running) + len(pending)
        changed = False
        for flight in [f for f in view.flights if f.instance == name]:
            pid = flight.prompt_id
            if flight.state == "releasing":
                if flight.until < now and await self.store.retake(
                    pid, self.replica, now, now + self.settings.lease_seconds
                ):
                    await self._recover(flight, upstream, {*running, *pending})
                    changed = True
                elif pid not in running and pid not in pending:
                    busy += 1  # being sent: it takes a place
                continue
            if pid in running:
                self._started.setdefault(pid, time.monotonic())
            elif pid in pending:
                continue
            elif flight.released_at >= read_at:
                # Released (a submission's straight-through send, on any replica) after the
                # queue was read: ComfyUI may not have listed it yet. Not ended (which would
                # free its place for one more send); it takes a place.
                busy += 1
            else:
                await self._ended(flight, view)  # keeps `view` in step
        room = self.capacity - busy
        # The first release chooses from the view just read (kept in step with the runs that
        # ended above), unless a lapsed release was recovered meanwhile. The claim checks the
        # owner's tag, so a view another replica made stale costs a retry, never a wrong
        # release.
        fresh: View | None = None if changed else view
        for _ in range(max(0, room)):
            if not await self._release_next(upstream, fresh):
                break
            fresh = None  # the claim changed the queue: the next choice reads it again
        else:
            if self.settings.pull_back and pending and room <= 0:
                await self._maybe_pull_back(upstream, pending)

    async def _release_next(self, upstream: Upstream, view: View | None = None) -> bool:
        """Claim and send the next prompt for ``upstream``, choosing from ``view`` when it is
        current (one Redis round trip per release instead of two), else from a fresh read."""
        for _ in range(CLAIM_ATTEMPTS):
            started = time.perf_counter()
            if view is None:
                view = await self.store.view(PER_USER)
            choice = self._choose_now(view, upstream.name)
            if choice is None:
                return False
            until = time.time() + self.settings.lease_seconds
            expect = view.finish.get(choice.item.owner, 0.0)
            body = await self.store.claim(choice, expect, upstream.name, self.replica, until)
            self.metrics.cost.observe(time.perf_counter() - started)
            if body is not None:
                await self._send(choice.item.prompt_id, body, upstream, first=True)
                return True
            view = None  # another replica claimed first, or the owner's tag moved: read again
        return False

    def _choose_now(self, view: View, instance: str) -> Choice | None:
        """:meth:`_choose` with each held prompt's cost the current estimate for that
        instance (the one fixed when it was queued may predate any measurement)."""
        queues = {
            owner: [replace(h, cost=self.estimates.seconds(h.shape, instance)) for h in items]
            for owner, items in view.queues.items()
        }
        return self._choose(replace(view, queues=queues), instance)

    @staticmethod
    def _choose(view: View, instance: str) -> Choice | None:
        vtime = virtual_time((f.in_flight for f in view.flights), view.last_start)
        return pick(view.queues, view.finish, vtime, instance)

    # -- straight through ------------------------------------------------------------------
    async def admit(self, entry: Entry, upstream: Upstream) -> Admission | None:
        """Hold a submission; then, when fair order picks it for ``upstream`` now and
        ``upstream`` has room, claim it for release by its own request. The request then
        forwards it itself and its client gets ComfyUI's own answer, exactly as without the
        queue (its validation errors, a 502 while ComfyUI is down): the queue only holds a
        prompt while ComfyUI is busy or others wait before it. Both steps under this
        process's room lock, so its feeder does not release the prompt in between (another
        replica's may: the client then gets the gateway queue's answer); the claim is the
        store's one atomic step, so no feeder ever releases it too. None: the prompt id is
        held already."""
        held = entry.held
        async with self._room:
            if not await self.store.hold(entry):
                return None
            wait = await self.expected_wait(held.owner, held.weight, held.shape)
            return Admission(wait, await self._claim_now(held.prompt_id, upstream))

    async def _claim_now(self, prompt_id: str, upstream: Upstream) -> bool:
        """Room is counted from the prompts claimed or released there and not yet seen
        ending; when that says full, from ComfyUI's queue (the count learns of ends a
        feeder's poll later)."""
        view = await self.store.view(PER_USER)
        flights = [f for f in view.flights if f.instance == upstream.name]
        if len(flights) >= self.capacity:
            # Full by the queue's account, which learns of ends a feeder's poll later:
            # ComfyUI's own queue says whether it still is.
            listed = await read_queue(self.pool, upstream)
            if listed is None:
                return False
            shown = {*listed[0], *listed[1]}
            sending = [f for f in flights if f.state == "releasing"]
            if len(shown | {f.prompt_id for f in sending}) >= self.capacity:
                return False
        started = time.perf_counter()
        choice = self._choose_now(view, upstream.name)
        if choice is None or choice.item.prompt_id != prompt_id:
            return False
        until = time.time() + self.settings.lease_seconds
        expect = view.finish.get(choice.item.owner, 0.0)
        body = await self.store.claim(choice, expect, upstream.name, self.replica, until)
        self.metrics.cost.observe(time.perf_counter() - started)
        return body is not None

    async def answered_now(self, prompt_id: str, status: int | None) -> None:
        """The outcome of a release made by its own request (:meth:`admit`): ComfyUI's
        status, None when the forward failed (the client got 502/504). Only a 200 stays in
        flight; anything else was answered to the client as ComfyUI (or the proxy) answered
        it without the queue, and the queue forgets the prompt: it is never sent again (the
        isolation record and the quota count follow ComfyUI's answer as in pass-through)."""
        entry = await self.store.entry(prompt_id)
        if status == 200:
            await self.store.released(prompt_id, self.replica, time.time())
            self._released_at[prompt_id] = time.monotonic()
            self.metrics.releases.labels("released").inc()
            if entry is not None:
                self.metrics.wait.labels(entry.held.role).observe(0.0)
            return
        await self.store.finish(prompt_id)
        outcome = "unreachable" if status is None or status >= 500 else "refused"
        self.metrics.releases.labels(outcome).inc()
        log.info("scheduler_straight_through_refused", prompt_id=prompt_id, status=status)

    # -- sending ---------------------------------------------------------------------------
    async def _send(self, prompt_id: str, body: bytes, upstream: Upstream, *, first: bool) -> None:
        entry = await self.store.entry(prompt_id)
        if entry is None:
            return
        await self._follow(entry, upstream)
        headers = {k: v for k, v in entry.headers}
        headers[hdrs.HOST] = upstream.host_header
        headers[hdrs.ORIGIN] = upstream.origin
        headers[hdrs.CONTENT_TYPE] = "application/json"
        try:
            async with self.pool.session.post(
                upstream.url_for("/prompt"),
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_SECONDS),
            ) as resp:
                status = resp.status
                answer = await resp.read()
        except aiohttp.ClientConnectorError as exc:
            # Nothing reached ComfyUI: back to the head of its owner's queue.
            await self.store.unclaim(prompt_id)
            self.metrics.releases.labels("unreachable").inc()
            log.warning("scheduler_release_unreachable", upstream=upstream.name, error=str(exc))
            return
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # Sent, then lost: ComfyUI may have it. The lease lapses and the next feeder asks
            # ComfyUI before sending it again (never twice).
            log.warning(
                "scheduler_release_unknown", upstream=upstream.name, error=type(exc).__name__
            )
            return
        held = entry.held
        if status == 200:
            now = time.time()
            await self.store.released(prompt_id, self.replica, now)
            self._released_at[prompt_id] = time.monotonic()
            self.metrics.releases.labels("released" if first else "resent").inc()
            self.metrics.wait.labels(held.role).observe(max(0.0, now - held.created))
            self.pool.note_submitted(upstream.name, frozenset())
            if self.quota is not None:
                self.quota.accept_later(prompt_id)
            log.info(
                "scheduler_released",
                prompt_id=prompt_id,
                owner=held.owner,
                upstream=upstream.name,
                waited_ms=round((now - held.created) * 1000, 1),
            )
            return
        if status >= 500:
            await self.store.unclaim(prompt_id)
            self.metrics.releases.labels("unreachable").inc()
            log.warning("scheduler_release_failed", upstream=upstream.name, status=status)
            return
        # ComfyUI refused it (its own validation): not queued; the quota count goes, and the
        # owner learns it as ComfyUI tells of a failed prompt: an execution_error, a failed
        # history entry kept by the gateway queue (ComfyUI has none).
        error = execution_error(held, answer, status)
        with contextlib.suppress(orjson.JSONDecodeError):
            sent = orjson.loads(body)
            failed = failed_entry(held, held.seq, sent if isinstance(sent, dict) else {}, error)
            await self.store.record_failed(held.owner, prompt_id, failed)
        await self.store.finish(prompt_id)
        self.metrics.releases.labels("refused").inc()
        # The ownership record stays: it keeps the failed entry its owner's (isolation lets
        # the owner, and only the owner, ask for it).
        if self.quota is not None:
            await self.quota.release([prompt_id], reason="refused")
        if self.notifier is not None:
            await self.notifier.refused(held, error)
            await self.notifier.status(held.owner, self.store.count)
        log.warning(
            "scheduler_release_refused",
            prompt_id=prompt_id,
            owner=held.owner,
            status=status,
            answer=answer[:500].decode("utf-8", "replace"),
        )

    async def _follow(self, entry: Entry, upstream: Upstream) -> None:
        """The ownership record and the quota count name the instance the prompt goes to
        (ComfyUI may send its events before it answers)."""
        pid = entry.held.prompt_id
        if self.quota is not None:
            await move_reservation(self.quota, self.redis, pid, upstream.name)
        if self.ownership is None:
            return
        record = await self.ownership.prompt(pid)
        if record is None or record.upstream == upstream.name:
            return
        await self.ownership.forget_prompt(pid)
        await self.ownership.record_prompt(replace(record, upstream=upstream.name))

    async def _recover(self, flight: Flight, upstream: Upstream, listed: set[str]) -> None:
        """A lapsed release lease, now this gate's: released already, or sent again."""
        pid = flight.prompt_id
        if pid in listed or await in_history(self.pool, upstream, pid):
            await self.store.released(pid, self.replica, time.time())
            self.metrics.releases.labels("recovered").inc()
            log.info("scheduler_release_recovered", prompt_id=pid, upstream=upstream.name)
            return
        entry = await self.store.entry(pid)
        if entry is None:
            await self.store.finish(pid)
            return
        log.info("scheduler_release_resent", prompt_id=pid, upstream=upstream.name)
        await self._send(pid, entry.body, upstream, first=False)

    async def _ended(self, flight: Flight, view: View) -> None:
        """Forget a run that ended and charge its owner what it took. ``view`` (the round's)
        is kept in step with what this writes, so the round's release can choose from it."""
        pid = flight.prompt_id
        await self.store.finish(pid)
        view.flights = [f for f in view.flights if f.prompt_id != pid]
        if self.wakeups is not None:
            # Room freed and a tag changed: other feeders' choices may change too.
            await self.wakeups.publish()
        began = self._started.pop(pid, None)
        self._released_at.pop(pid, None)
        if began is None:
            # Never seen running here (another replica fed it, or it was too quick): charged
            # what such a run is now known to take, if anything is known yet.
            known = self.estimates.values.get(self.estimates.key(flight.instance, flight.shape))
            if known is not None:
                await self._settle(flight, known, view)
            return
        seconds = time.monotonic() - began
        self.metrics.ran(flight.owner, seconds)
        changed = self.estimates.observe(flight.instance, flight.shape, seconds)
        await self._settle(flight, seconds, view)
        with contextlib.suppress(*STORE_ERRORS):
            await self.store.put_estimates(changed)

    async def _settle(self, flight: Flight, seconds: float, view: View) -> None:
        """The owner's finish tag charged the run's measured time instead of the estimate it
        was released on. Without this, the prompts released before the first measurement
        (the default estimate: 10 s for a 0.1 s run) would skew every later choice by the
        difference, in favour of whichever weight paid less for them. The tag never drops
        below the virtual time plus the owner's work still in service (re-estimated): a user
        with a prompt running is never as entitled as one with nothing running."""
        if flight.cost <= 0 or flight.credit <= 0:
            return
        current = view.finish.get(flight.owner, 0.0)
        others = [f for f in view.flights if f.prompt_id != flight.prompt_id]
        vtime = virtual_time((f.in_flight for f in others), view.last_start)
        floor = vtime + sum(
            f.credit * self.estimates.seconds(f.shape, f.instance) / f.cost
            for f in others
            if f.owner == flight.owner and f.cost > 0
        )
        target = max(current + flight.credit * (seconds / flight.cost - 1.0), floor)
        if abs(target - current) > 1e-9:
            # The round's view follows, so the round's release can choose from it.
            view.finish[flight.owner] = await self.store.charge(flight.owner, target - current)

    async def _maybe_pull_back(self, upstream: Upstream, pending: Sequence[str]) -> None:
        view = await self.store.view(PER_USER)
        choice = self._choose_now(view, upstream.name)
        if choice is None:
            return
        ours = {f.prompt_id: f for f in view.flights if f.state == "released"}
        victim = next((ours[p] for p in reversed(pending) if p in ours), None)
        if victim is None or not should_pull_back(victim.in_flight, choice):
            return
        self._pulling.add(victim.prompt_id)
        try:
            if not await delete_pending(self.pool, upstream, victim.prompt_id):
                return
            listed = await read_queue(self.pool, upstream)
            if listed is None or victim.prompt_id in {*listed[0], *listed[1]}:
                return  # it started meanwhile: it runs
            if await in_history(self.pool, upstream, victim.prompt_id):
                return  # it ran meanwhile
            pulled = await self.store.unclaim(victim.prompt_id)
        finally:
            self._pulling.discard(victim.prompt_id)
        if pulled:
            self.metrics.releases.labels("pulled_back").inc()
            log.info("scheduler_pulled_back", prompt_id=victim.prompt_id, upstream=upstream.name)
            await self._release_next(upstream)

    async def live_ids(self) -> set[str]:
        """Held prompts, those being sent, and those this gate is taking back: queued for their
        owners though ComfyUI lists none of them (the queue quota's reconciler must not stop
        counting them). A released prompt is not among them: ComfyUI lists it while it is live,
        and the reconciler must see it end as soon as ComfyUI does, not a feeder's poll later."""
        flights = await self.store.flights()
        sending = {f.prompt_id for f in flights if f.state != "released"}
        return await self.store.held_ids() | sending | self._pulling

    # -- estimates -------------------------------------------------------------------------
    async def expected_wait(self, owner: str, weight: float, shape: str) -> float:
        """Seconds until ``owner``'s newest held prompt starts, roughly (see
        :func:`proxy.scheduler.fair.expected_wait`)."""
        view = await self.store.view(PER_USER)
        mine = view.queues.get(owner, [])
        ahead = [self.estimates.seconds(h.shape) for h in mine[:-1]]
        active = sum(max((h.weight for h in q), default=1.0) for q in view.queues.values())
        in_flight = sum(self.estimates.seconds(f.shape, f.instance) for f in view.flights)
        del shape
        return expected_wait(
            ahead,
            weight=weight,
            active_weights=max(active, weight),
            in_flight_seconds=in_flight,
            instances=max(1, len(self.instances())),
        )


async def read_queue(pool: UpstreamPool, upstream: Upstream) -> tuple[list[str], list[str]] | None:
    """The ids ``upstream`` lists as running and as pending; None when unreadable."""
    try:
        async with pool.session.get(
            upstream.url_for("/queue"),
            headers={hdrs.HOST: upstream.host_header},
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_SECONDS),
        ) as resp:
            if resp.status != 200:
                return None
            queue = orjson.loads(await resp.read())
    except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(queue, dict) or not all(
        isinstance(queue.get(k), list) for k in ("queue_running", "queue_pending")
    ):
        return None
    return queue_ids(queue, "queue_running"), queue_ids(queue, "queue_pending")


async def in_history(pool: UpstreamPool, upstream: Upstream, prompt_id: str) -> bool:
    """Whether ``upstream``'s history has ``prompt_id`` (it ran). Unreadable: assumed it did,
    so that a prompt is never sent twice on a guess (it stays listed as released)."""
    try:
        async with pool.session.get(
            upstream.url_for(f"/history/{prompt_id}"),
            headers={hdrs.HOST: upstream.host_header},
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_SECONDS),
        ) as resp:
            if resp.status != 200:
                return True
            answer = orjson.loads(await resp.read())
    except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
        return True
    return isinstance(answer, dict) and prompt_id in answer


async def delete_pending(pool: UpstreamPool, upstream: Upstream, prompt_id: str) -> bool:
    """``POST /queue {"delete": [id]}`` (ComfyUI removes it only while it is pending)."""
    try:
        async with pool.session.post(
            upstream.url_for("/queue"),
            data=orjson.dumps({"delete": [prompt_id]}),
            headers={
                hdrs.HOST: upstream.host_header,
                hdrs.ORIGIN: upstream.origin,
                hdrs.CONTENT_TYPE: "application/json",
            },
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_SECONDS),
        ) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


__all__ = ["Admission", "Gate", "delete_pending", "in_history", "read_queue"]
