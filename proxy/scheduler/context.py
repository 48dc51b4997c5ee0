"""The gateway queue's lifetime, its admin route and its place in the guard chains."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

from aiohttp import web

from proxy.chain import Endpoint, Guard
from proxy.isolation.read_guard import ReadGuard
from proxy.limits.quota.service import QUEUE_QUOTA
from proxy.observability.metrics import METRICS
from proxy.redis.client import REDIS
from proxy.request.prompt import PromptReader
from proxy.routes import RuleName
from proxy.scheduler.gate import Gate
from proxy.scheduler.hook import CancelGuard, HoldGuard, ViewGuard
from proxy.scheduler.keys import GATE
from proxy.scheduler.metrics import SchedulerMetrics
from proxy.scheduler.notify import Notifier
from proxy.scheduler.store import MemoryStore, RedisStore, SchedulerStore
from proxy.scheduler.wakeup import Wakeups
from proxy.settings import SETTINGS, Settings
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.pool import POOL

ADMIN_SCHEDULER = "admin_scheduler"
"""Permission (``roles.<r>.allow_routes``) and route name of ``GET {base}/admin/scheduler``."""


async def scheduler_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the store (Redis when configured), the feeder task, and the queue
    quota's view of held prompts (they are the owner's queued prompts: still counted)."""
    settings = app[SETTINGS]
    if not settings.scheduler.enabled:
        yield
        return
    client = app[REDIS]
    store: SchedulerStore = RedisStore(client) if client is not None else MemoryStore()
    metrics = SchedulerMetrics(app[METRICS].registry, settings.scheduler.fairness_window_seconds)
    quota = app.get(QUEUE_QUOTA)
    gate = Gate(
        settings.scheduler,
        store,
        app[POOL],
        metrics,
        ownership=app[OWNERSHIP] if settings.isolation.enabled else None,
        quota=quota,
        redis=client,
    )
    gate.notifier = Notifier(app)
    if client is not None:
        failures = app[METRICS].task_failures
        gate.wakeups = Wakeups(client, gate.replica, gate.wake, metrics, failures=failures)
    app[GATE] = gate
    if quota is not None and quota.reconciler is not None:
        quota.reconciler.also_live = gate.live_ids
    gate.start()
    yield
    await gate.stop()


async def list_queue(request: web.Request) -> web.Response:
    """``GET {base}/admin/scheduler``: every held prompt in run order per user, and every
    prompt released and not yet seen ending (no bodies, no graphs)."""
    gate = request.app.get(GATE)
    if gate is None:
        return web.json_response({"enabled": False, "held": [], "in_flight": []})
    held = await gate.store.held(None)
    flights = await gate.store.flights()
    now = time.time()
    return web.json_response(
        {
            "enabled": True,
            "replica": gate.replica,
            "held": [_held(asdict(h), now) for h in held],
            "in_flight": [asdict(f) for f in flights],
            "estimates": gate.estimates.values,
        }
    )


def _held(item: dict[str, Any], now: float) -> dict[str, Any]:
    item.pop("client_id", None)
    item["waiting_seconds"] = round(now - item["created"], 3)
    return item


def add_scheduler_route(app: web.Application, *, base_path: str) -> None:
    app.router.add_get(
        f"{base_path}/admin/scheduler", list_queue, name=ADMIN_SCHEDULER, allow_head=False
    )


def with_scheduler(
    endpoints: dict[RuleName, Endpoint], gate: Gate, settings: Settings, prompts: PromptReader
) -> None:
    """The gateway queue's guards (``proxy.scheduler.hook``) in the route table: holding last
    on ``POST /prompt``; cancelling before isolation on ``POST /queue`` (it must see a
    ``clear`` before isolation narrows it); views last on queue, jobs and ws. Each is built
    with ``gate`` (``app[GATE]``, set by :func:`scheduler_context`)."""

    def extend(name: RuleName, *more: Guard) -> None:
        endpoints[name] = replace(endpoints[name], guards=(*endpoints[name].guards, *more))

    extend("prompt", HoldGuard(gate, prompts))
    queue = list(endpoints["queue"].guards)
    at = next((i for i, g in enumerate(queue) if isinstance(g, ReadGuard)), len(queue))
    cancel = CancelGuard(gate, settings, prompts.bodies)
    endpoints["queue"] = replace(endpoints["queue"], guards=(*queue[:at], cancel, *queue[at:]))
    view = ViewGuard(gate, settings)
    for name in ("queue", "jobs", "ws", "history"):
        extend(name, view)


__all__ = ["ADMIN_SCHEDULER", "add_scheduler_route", "scheduler_context", "with_scheduler"]
