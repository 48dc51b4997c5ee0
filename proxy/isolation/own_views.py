"""A tenant's ``GET /history`` and ``GET /api/jobs`` built from their own prompts only.

ComfyUI has no per-user listing: filtering its whole history on every poll costs every user
everyone's history (a fetch and a parse of up to 10,000 entries per instance). Instead the read
guard pages through the owner's view index (:mod:`proxy.tenancy.ownership`: their prompt ids
in submission order) and asks ComfyUI for those prompts one by one, ``GET /history/{id}`` or
``GET /api/jobs/{id}``, at most :data:`LOOKUP_CONCURRENCY` at once, each at the instance that
runs it. The answer keeps ComfyUI's shape, order and paging:

* ``/history``: entries in completion order (ComfyUI inserts an entry when its prompt ends; the
  order is the entries' last status timestamp, as for merged instances), windowed with
  ComfyUI's ``max_items``/``offset`` rules (:func:`~proxy.comfy.views.history_window`).
  ``max_items=N`` (newest N) looks up the owner's newest prompts until N finished ones are found;
  ``offset=M`` looks up their oldest until ``M + max(N, 1)`` are found; no paging, all of them.
  Which prompts fill a window is decided in submission order, which is ComfyUI's completion
  order on one instance (it runs its queue in order): a prompt that finished long after newer
  ones (a ``front`` submission, another instance) may be left out of a window it belongs to.
* ``/api/jobs``: every job of the owner (ComfyUI counts ``total`` over all of them), filtered,
  sorted and paginated as ComfyUI does (:func:`~proxy.comfy.views.jobs_answer`). Job
  details ComfyUI no longer knows (deleted, trimmed, cancelled before running) are dropped from
  the index once seen missing on two requests (once could be a prompt moving from the queue to
  history between ComfyUI's two reads), so the index follows what ComfyUI keeps.

Work per request is bounded: at most ``isolation.view_lookups`` ids looked up. A request that
would need more (a window deeper than that, a user with more prompts than that for
``/api/jobs``) is answered as before, from one full read filtered to the owner's prompts, and
counted (``comfygate_upstream_errors_total{kind="view_full_read"}``) and logged; so is one
whose lookups failed (an instance unreadable, slow or broken): the full read then gives the
answer and the error the client would have had before (502s, ``Comfygate-Degraded``). A user with
no prompt at all costs one ``/api/jobs?limit=1`` (ComfyUI's own parameter check and answer for
an unknown route) or nothing (``/history``: ``{}``).

SECURITY: only ids from the caller's own index are ever asked for, and each is checked against
its record's owner again before its answer is used (the index is not what isolation decides
on); the fallback is the filter the guard always applied.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from proxy.comfy import views
from proxy.comfy.records import PromptRecord
from proxy.multi.dispatch import MULTI, is_multi
from proxy.multi.merge import (
    Answer,
    Gathered,
    ask,
    entry_time,
    instance_headers,
    json_response,
)
from proxy.observability.metrics import METRICS
from proxy.settings import SETTINGS
from proxy.state import CONTEXT
from proxy.tenancy.ownership import OWNERSHIP, OwnershipStore
from proxy.upstream.pool import POOL, Upstream

log = structlog.get_logger("comfygate.isolation.views")

LOOKUP_CONCURRENCY = 8
"""Per-id requests in flight at once for one view (ComfyUI serves them one by one anyway)."""
PRUNE_AFTER_SECONDS = 300.0
"""A job ComfyUI does not know is dropped from the index only when its record is at least this
old: a prompt is recorded before it is forwarded, and ComfyUI may take a while to queue it."""
SUSPECTS_SIZE = 50_000

Fallback = Callable[[], Awaitable[web.StreamResponse]]
"""Answers the request from one full read, filtered (the guard's former path)."""


@dataclass(slots=True)
class Found:
    """What the lookups of one view found."""

    items: dict[str, Any] = field(default_factory=dict)
    """id -> history entry or job list item, in the order the ids were looked up."""
    gone: list[str] = field(default_factory=list)
    """Ids ComfyUI answered it does not know (job lookups only)."""
    failed: bool = False
    """A lookup failed (an instance unreadable, too slow, broken): the view is answered from
    the full read instead, whose errors and degraded answers are ComfyUI's and the merge's."""
    no_jobs_api: bool = False
    """An instance answered a job lookup with a 404 of its router: no ``/api/jobs`` there."""
    seconds: float = 0.0


class Lookups:
    """Per-id reads for one request, each at the instance its prompt runs on."""

    def __init__(self, request: web.Request, owner: str, suspects: OrderedDict[str, None]) -> None:
        self._request = request
        self._owner = owner
        self._store: OwnershipStore = request.app[OWNERSHIP]
        self._pool = request.app[POOL]
        self._multi = is_multi(self._pool)
        self._headers: dict[str, CIMultiDict[str]] = {}
        self._gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)
        self._suspects = suspects
        self.lookups = 0

    def _headers_for(self, upstream: Upstream) -> CIMultiDict[str]:
        base = next(iter(self._headers.values()), None)
        if upstream.name not in self._headers:
            self._headers[upstream.name] = instance_headers(self._request, upstream, base)
        return self._headers[upstream.name]

    async def _ask(self, upstream: Upstream, raw_path: str) -> Answer | None:
        async with self._gate:
            return await ask(
                self._request, upstream, "GET", raw_path, headers=self._headers_for(upstream)
            )

    async def fetch(self, ids: Sequence[str], *, jobs: bool, into: Found) -> None:
        """Look up ``ids``; what is found goes into ``into`` (in ``ids``' order).

        A prompt whose instance is unreachable is left out (or answered as failed when it was
        reported lost), as the merged views leave that instance out."""
        started = time.perf_counter()
        self.lookups += len(ids)
        records = await self._store.records(ids)
        targets: list[tuple[str, PromptRecord, Upstream | None]] = []
        reachable = {u.name: u for u in self._pool.reachable()} if self._multi else {}
        home = None if self._multi else self._pool.home()
        for prompt_id, record in zip(ids, records, strict=True):
            if record is None or record.owner != self._owner:
                continue  # SECURITY: expired, or never the caller's (the record decides)
            targets.append((prompt_id, record, home or reachable.get(record.upstream)))
        # The form the client used (ComfyUI serves both); /api/jobs has no bare form.
        api = "/api" if jobs or self._request[CONTEXT].upstream_path.startswith("/api/") else ""
        path = api + ("/jobs/{}" if jobs else "/history/{}")
        answers = await asyncio.gather(
            *(
                self._ask(upstream, path.format(quote(pid, safe="")))
                for pid, _, upstream in targets
                if upstream is not None
            )
        )
        replies = iter(answers)
        lost = self._request.app[MULTI].lost if self._multi else None
        for prompt_id, record, upstream in targets:
            reply = next(replies) if upstream is not None else None
            gone = lost.lost(prompt_id) if lost is not None else None
            if upstream is None:  # unreachable: a lost prompt answers as failed
                if gone is not None:
                    into.items[prompt_id] = gone.job() if jobs else gone.history_entry()
                continue
            if reply is None or reply.status not in (200, 404):
                into.failed = True
                continue
            found = reply.json()
            if jobs:
                if reply.status == 404 and not (isinstance(found, dict) and "error" in found):
                    into.no_jobs_api = True  # aiohttp's own 404: an older ComfyUI
                elif reply.status == 200 and isinstance(found, dict):
                    into.items[prompt_id] = views.job_list_item(found)
                elif gone is not None:
                    into.items[prompt_id] = gone.job()
                elif record.created_at < time.time() - PRUNE_AFTER_SECONDS:
                    into.gone.append(prompt_id)
                continue
            entry = found.get(prompt_id) if isinstance(found, dict) else None
            if isinstance(entry, dict):
                shown = views.sent_client_ids([record])
                views.show_client_id(views.entry_extra_data(entry), shown)
                into.items[prompt_id] = entry
                if self._multi and upstream is not None:
                    self._request.app[MULTI].locations.record_history(
                        upstream.name, {prompt_id: entry}, self._owner
                    )
            elif gone is not None:
                into.items[prompt_id] = gone.history_entry()
        into.seconds += time.perf_counter() - started

    async def prune(self, gone: Sequence[str]) -> None:
        """Drop from the index the ids ComfyUI did not know on this request and an earlier
        one (a single miss may be a prompt between ComfyUI's queue and its history)."""
        twice = [pid for pid in gone if pid in self._suspects]
        for pid in gone:
            self._suspects[pid] = None
        while len(self._suspects) > SUSPECTS_SIZE:
            self._suspects.popitem(last=False)
        if twice:
            for pid in twice:
                self._suspects.pop(pid, None)
            await self._store.unindex(self._owner, twice)


def completion_order(found: Mapping[str, Any]) -> dict[str, Any]:
    """History entries (in submission order) in ComfyUI's order: by the time each prompt ended
    (an entry without a timestamp stays after the one before it), ties in submission order."""
    keyed: list[tuple[float, int, str]] = []
    last = float("-inf")
    for rank, (prompt_id, entry) in enumerate(found.items()):
        stamp = entry_time(entry)
        if stamp is not None:
            last = max(last, stamp)
        keyed.append((last, rank, prompt_id))
    keyed.sort()
    return {pid: found[pid] for _, _, pid in keyed}


def jobs_listing_order(items: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Job list items (submission order) in the order ComfyUI lists them before sorting:
    running, pending (by priority), then finished ones in completion order."""
    running = [j for j in items.values() if j.get("status") == "in_progress"]
    pending = [j for j in items.values() if j.get("status") == "pending"]
    done = [j for j in items.values() if j.get("status") not in ("in_progress", "pending")]
    pending.sort(key=lambda j: j.get("priority") if _number(j.get("priority")) else 0)
    done_order = sorted(
        range(len(done)),
        key=lambda i: (_end(done[i]), i),
    )
    return [*running, *pending, *(done[i] for i in done_order)]


def _end(job: Mapping[str, Any]) -> float:
    end = job.get("execution_end_time")
    return float(end) if isinstance(end, (int, float)) else float("-inf")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class HistoryPlan:
    """Which of the owner's prompts a ``/history`` window needs."""

    newest_first: bool
    needed: int | None
    """Finished entries to find (None: all of them)."""


def history_plan(max_items: int | None, offset: int | None) -> HistoryPlan | None:
    """What to look up for ComfyUI's ``max_items``/``offset`` (None: the window is empty)."""
    if offset is None or offset < 0:
        if max_items is None:
            return HistoryPlan(newest_first=False, needed=None)
        if max_items <= 0:
            return None  # ComfyUI starts at len - max_items >= len: nothing
        return HistoryPlan(newest_first=True, needed=max_items)
    if max_items is None:
        return HistoryPlan(newest_first=False, needed=None)
    return HistoryPlan(newest_first=False, needed=offset + max(max_items, 1))


class OwnViews:
    """The per-request views (one instance per proxy process: it keeps the prune suspects)."""

    def __init__(self) -> None:
        self._suspects: OrderedDict[str, None] = OrderedDict()

    async def history(
        self,
        request: web.Request,
        owner: str,
        *,
        max_items: int | None,
        offset: int | None,
        fallback: Fallback,
        record_files: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> web.StreamResponse:
        """``GET /history[?max_items&offset]`` of ``owner``."""
        plan = history_plan(max_items, offset)
        if plan is None:
            return self._respond(request, Found(), {})
        store = request.app[OWNERSHIP]
        budget = request.app[SETTINGS].isolation.view_lookups
        count = await store.indexed_count(owner)
        if count == 0:
            return self._respond(request, Found(), {})
        needed = count if plan.needed is None else plan.needed
        if min(needed, count) > budget:
            return await self._full_read(request, "history", count, fallback, None)
        lookups = Lookups(request, owner, self._suspects)
        found = Found()
        skip, exhausted = 0, False
        while len(found.items) < needed:
            want = min(needed - len(found.items), budget - lookups.lookups)
            if want <= 0:
                break  # the budget is spent
            ids = await store.indexed(owner, newest_first=plan.newest_first, skip=skip, count=want)
            skip += len(ids)
            if ids:
                await lookups.fetch(ids, jobs=False, into=found)
            if len(ids) < want:
                exhausted = True
                break
        if found.failed or (len(found.items) < needed and not exhausted):
            return await self._full_read(request, "history", count, fallback, found)
        items = found.items
        if plan.newest_first:  # looked up newest first: back to submission order
            items = dict(reversed(items.items()))
        history = completion_order(items)
        await record_files(history)
        window = views.history_window(history, max_items, offset)
        return self._respond(request, found, window)

    async def jobs(
        self,
        request: web.Request,
        owner: str,
        query: views.JobsQuery,
        fallback: Fallback,
        probe: Fallback,
    ) -> web.StreamResponse:
        """``GET /api/jobs`` of ``owner`` (``query`` valid for ComfyUI)."""
        store = request.app[OWNERSHIP]
        budget = request.app[SETTINGS].isolation.view_lookups
        count = await store.indexed_count(owner)
        if count == 0:
            return await probe()
        if count > budget:
            return await self._full_read(request, "jobs", count, fallback, None)
        lookups = Lookups(request, owner, self._suspects)
        found = Found()
        ids = await store.indexed(owner, newest_first=False, count=budget)
        await lookups.fetch(ids, jobs=True, into=found)
        if found.no_jobs_api:
            return await fallback()  # ComfyUI's own answer for a route it does not have
        if found.failed:
            return await self._full_read(request, "jobs", count, fallback, found)
        await lookups.prune(found.gone)
        answer = views.jobs_answer(jobs_listing_order(found.items), query)
        return self._respond(request, found, answer)

    @staticmethod
    async def _full_read(
        request: web.Request, view: str, count: int, fallback: Fallback, found: Found | None
    ) -> web.StreamResponse:
        request.app[METRICS].upstream_errors.labels("*", "view_full_read").inc()
        log.info(
            "view_full_read",
            request_id=request[CONTEXT].request_id,
            view=view,
            own_prompts=count,
            reason="lookup_failed" if found is not None else "over_limit",
            limit=request.app[SETTINGS].isolation.view_lookups,
        )
        return await fallback()

    @staticmethod
    def _respond(request: web.Request, found: Found, payload: object) -> web.StreamResponse:
        """The view as ComfyUI's JSON answer, accounted like a merged one."""
        pool = request.app[POOL]
        gathered = Gathered([], [], found.seconds)
        response = json_response(request, gathered, 200, orjson.dumps(payload))
        if not is_multi(pool):
            request[CONTEXT].upstream = pool.home().name
        return response


__all__ = ["Found", "HistoryPlan", "Lookups", "OwnViews", "completion_order", "history_plan"]
