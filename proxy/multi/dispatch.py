"""Several ComfyUI instances presented as one: where each request goes once the guards passed.

``app.dispatch`` hands a request here only when the pool has several instances (or discovery);
with one configured instance nothing of this runs (the direct forward and relay paths are
unchanged, at no extra cost).

=====================================================  ========================================
``GET /history``, ``/queue``, ``/api/jobs``, ``/prompt``  merged over every reachable instance
(HEAD: the GET's answer without its body)              (:mod:`proxy.multi.merge`)
per-prompt routes, ``/view`` outputs                   the instance concerned
                                                       (:mod:`proxy.multi.sticky`)
``/ws``                                                a socket to every reachable instance
                                                       (:mod:`proxy.multi.fanin`)
settings, user data, ``user.css``, uploads, models,    the home instance (``pool.home()``), or
everything else                                        the instance a guard chose
                                                       (``ctx.target``, e.g. placement)
=====================================================  ========================================

While the home instance is down, its read-only routes go to another instance and settings and
user data answer 503 (:mod:`proxy.relay.home`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiohttp import web

from proxy.multi import merge, sticky
from proxy.multi.fanin import FanInRegistry, relay_fanin
from proxy.multi.lost import LostPrompts
from proxy.observability.metrics import METRICS
from proxy.redis.client import REDIS
from proxy.relay.forward import forward_http
from proxy.settings import SETTINGS
from proxy.state import CONTEXT
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.pool import POOL, Upstream, UpstreamPool


@dataclass(slots=True)
class MultiInstance:
    """What the proxy keeps to present several instances as one."""

    locations: sticky.FileLocations
    lost: LostPrompts
    fanin: FanInRegistry

    async def on_pool_event(self, event: str, upstream: Upstream) -> None:
        """``pool.subscribe`` listener: instances leaving, failing, coming back or joining."""
        if event in ("down", "left"):
            await self.lost.instance_lost(upstream)
            await self.fanin.instance_gone(upstream, left=event == "left")
        elif event in ("up", "joined"):
            await self.fanin.instance_available(upstream)


MULTI = web.AppKey("comfygate.multi_instance", MultiInstance)


def is_multi(pool: UpstreamPool) -> bool:
    """Whether requests take the multi-instance paths: several instances, or discovery (which
    may add some at runtime: sockets opened while there is one must hear the next ones too).
    A single configured instance never does."""
    return pool.managed or len(pool.upstreams) > 1


async def multi_instance_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the fan-in registry, file locations and the lost-prompt watch."""
    settings = app[SETTINGS]
    fanin = FanInRegistry()
    lost = LostPrompts(
        pool=app[POOL],
        ownership=app[OWNERSHIP],
        metrics=app[METRICS],
        retention_seconds=settings.isolation.retention_seconds,
        watch_seconds=settings.upstream.lost_watch_seconds,
        timeout_seconds=settings.upstream.merge_timeout_seconds,
        notify=fanin.notify,
        redis_client=app[REDIS],  # verdicts and finished marks shared by replicas
    )
    state = MultiInstance(sticky.FileLocations(), lost, fanin)
    fanin.on_finished = state.lost.note_finished
    fanin.locations = state.locations
    app[MULTI] = state
    app[POOL].subscribe(state.on_pool_event)
    if is_multi(app[POOL]):  # one configured instance: nothing can be lost to another
        lost.start()
    yield
    await lost.close()
    await fanin.close()


async def dispatch_multi(request: web.Request) -> web.StreamResponse:
    """The terminal handler of a rule with no view of its own when there are several
    instances: the request goes to the instance a guard chose, else to the home one."""
    return await forward_http(request)


# The per-rule terminal handlers with several instances (each rule's ``multi_handler`` in the
# route table, ``app.build_routes``). A guard that already chose the instance (placement,
# replication) wins; HEAD takes the GET's path (merged, filtered): the GET's answer, no body.
_READS = frozenset({"GET", "HEAD"})


async def multi_history(request: web.Request) -> web.StreamResponse:
    """``/history``: merged over every instance; ``/history/{id}`` from the one holding it."""
    ctx = request[CONTEXT]
    if ctx.target is None:
        if request.method in _READS:
            if ctx.path == "/history":
                return await merge.merged_history(request, request.app[MULTI])
            return await sticky.history_entry(
                request, request.app[MULTI], ctx.path.split("/", 2)[2]
            )
        if request.method == "POST":
            return await sticky.split_delete(request, request.app[MULTI], history=True)
    return await forward_http(request)


async def multi_queue(request: web.Request) -> web.StreamResponse:
    """``/queue``: merged over every instance; a delete split by where each prompt is."""
    ctx = request[CONTEXT]
    if ctx.target is None:
        if request.method in _READS:
            return await merge.merged_queue(request, request.app[MULTI])
        if request.method == "POST":
            return await sticky.split_delete(request, request.app[MULTI], history=False)
    return await forward_http(request)


async def multi_jobs(request: web.Request) -> web.StreamResponse:
    """``/jobs``: the list merged; one job (or its cancel) from the instance running it."""
    ctx = request[CONTEXT]
    if ctx.target is None:
        state = request.app[MULTI]
        segments = ctx.path.split("/")[2:]  # "/jobs/<id>/cancel" -> ["<id>", "cancel"]
        if not segments:
            if request.method in _READS:
                return await merge.merged_jobs(request, state)
        elif segments == ["cancel"] and request.method == "POST":
            return await sticky.jobs_cancel_many(request, state)
        elif segments[0]:
            return await sticky.job(request, state, segments[0], segments[1:])
    return await forward_http(request)


async def multi_interrupt(request: web.Request) -> web.StreamResponse:
    """``POST /interrupt``: sent to the instance running the prompt."""
    if request[CONTEXT].target is None and request.method == "POST":
        return await sticky.interrupt(request, request.app[MULTI])
    return await forward_http(request)


async def multi_view(request: web.Request) -> web.StreamResponse:
    """``/view``: read from the instance holding the file."""
    if request[CONTEXT].target is None and request.method in _READS:
        return await sticky.view(request, request.app[MULTI])
    return await forward_http(request)


async def multi_prompt(request: web.Request) -> web.StreamResponse:
    """``POST /prompt``: to the placed instance, watched for loss; ``GET``: merged info."""
    ctx = request[CONTEXT]
    if request.method == "POST":
        _watch_submission(request, request.app[MULTI])
    elif ctx.target is None and request.method in _READS:
        return await merge.merged_prompt_info(request, request.app[MULTI])
    return await forward_http(request)


async def relay_websocket_multi(request: web.Request) -> web.StreamResponse:
    """The terminal handler for WebSocket upgrades when there are several instances."""
    return await relay_fanin(request, request.app[MULTI].fanin)


def _watch_submission(request: web.Request, state: MultiInstance) -> None:
    """Tell the lost-prompt watch about an accepted submission at once (the periodic watch
    would learn of it only at its next read)."""
    ctx = request[CONTEXT]
    pool = request.app[POOL]

    async def note(status: int, body: bytes) -> bytes:
        if status == 200:
            with contextlib.suppress(orjson.JSONDecodeError):
                accepted = orjson.loads(body)
                prompt_id = accepted.get("prompt_id") if isinstance(accepted, dict) else None
                number = accepted.get("number") if isinstance(accepted, dict) else None
                if isinstance(prompt_id, str):
                    # The record names the instance that accepted it (placement moves it on a
                    # failover); without isolation there is none: the chosen instance.
                    record = await request.app[OWNERSHIP].prompt(prompt_id)
                    name = record.upstream if record else (ctx.target or pool.home()).name
                    state.lost.watch.note_submitted(
                        name, prompt_id, number if isinstance(number, (int, float)) else 0
                    )
        return body

    ctx.response_filters.append(note)


__all__ = [
    "MULTI",
    "MultiInstance",
    "dispatch_multi",
    "is_multi",
    "multi_history",
    "multi_instance_context",
    "multi_interrupt",
    "multi_jobs",
    "multi_prompt",
    "multi_queue",
    "multi_view",
    "relay_websocket_multi",
]
