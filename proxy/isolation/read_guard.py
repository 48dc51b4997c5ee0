"""``ReadGuard``: tenant isolation of what a user reads and cancels, and of its WebSockets.

Runs after the role guard on the rules ``history``, ``queue``, ``jobs``, ``interrupt`` and
``ws``. With ``isolation.enabled`` false it does nothing; admins see everything unfiltered (their
sockets' client ids are still namespaced, as every submitted prompt's are).

Per route, for a non-admin caller (``owner`` = ``principal.comfy_user``):

==========================================  ================================================
``GET /history``                            only the caller's entries, read one by one from
                                            their view index, ComfyUI's ``max_items``/``offset``
                                            applied to their list (``own_views``)
``GET /history/{id}``                       ``{}`` for others' ids (as for an unknown id)
``POST /history``                           ``delete`` of own ids only; ``clear`` -> ``delete``
                                            of own ids; nothing left -> 200 without upstream
``GET /queue``                              own items in full, others' as placeholders
``POST /queue``                             ``delete`` of own ids only; ``clear`` -> ``delete``
                                            of own pending ids (read from upstream ``/queue``)
``GET /api/jobs``                           own jobs, read one by one, filtered, sorted and
                                            paginated here as ComfyUI does (``own_views``)
``GET /api/jobs/{id}[/...]``                others: 404 ``{"error": "Job not found"}``
``POST /api/jobs/{id}/cancel``              others: 200 ``{"cancelled": false}``, no upstream
``POST /api/jobs/cancel``                   others' ids dropped from ``job_ids``
``POST /interrupt`` with ``prompt_id``      others' / unknown: 200 no-op, no upstream
``POST /interrupt`` without                 -> ``{"prompt_id": <own running id>}``, or a 200
                                            no-op when what runs is not the caller's
``/ws``                                     upstream ``clientId`` = ``upstream_client_id(owner,
                                            client id)`` (minted when absent); frames filtered
                                            by :class:`~proxy.tenancy.events.SocketEventFilter`
==========================================  ================================================

In the caller's own history entries, queue items and job details, ``extra_data.client_id``
(the namespaced id ComfyUI saw) is shown as the ``client_id`` the client sent, as the socket's
``sid`` is (the prompt's record keeps it). Admins' unfiltered views show ComfyUI's ids.

History and job-detail answers also record the previews of the caller's prompts as the caller's
files (so ``/view`` of temp previews works for API clients that never had a socket); only what
:mod:`proxy.tenancy.attribution` attributes, never every file a node's output names.

Answers the guard gives itself (no-ops, "not found") are raised as :class:`LocalAnswer`, shaped
exactly as ComfyUI would answer for an unknown id.
"""

from __future__ import annotations

import secrets
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import aiohttp
import orjson
import redis.asyncio as redis
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisClusterException

from proxy.comfy import views
from proxy.comfy.records import FileRef
from proxy.errors import Forbidden, UpstreamUnavailable
from proxy.isolation.own_views import OwnViews
from proxy.isolation.owned_entries import own_entries
from proxy.isolation.record_cache import record_cache
from proxy.multi.dispatch import MULTI
from proxy.multi.merge import DEGRADED_HEADER, fetch_merged_queue, parsed_answer
from proxy.observability.metrics import METRICS, Metrics
from proxy.principal import Principal
from proxy.relay.outgoing import map_client_error
from proxy.request.bodies import read_json_body
from proxy.settings import SETTINGS, IsolationSettings
from proxy.settings.auth import RoleSettings
from proxy.state import CONTEXT, RequestContext
from proxy.tenancy.attribution import attributed_outputs
from proxy.tenancy.events import SocketEventFilter
from proxy.tenancy.namespaces import upstream_client_id
from proxy.tenancy.ownership import OwnershipStore
from proxy.upstream.encoding import IDENTITY, read_client_answer
from proxy.upstream.pool import POOL

log = structlog.get_logger("comfygate.isolation")

HISTORY_PAGING = ("max_items", "offset")
JOBS_PAGING = ("limit", "offset")
JOB_NOT_FOUND = {"error": "Job not found"}
RECORDED_CACHE_SIZE = 10_000
DEGRADED_STATE = "state"
"""``Comfygate-Degraded`` value of a view answered without the ownership store."""
STATE_ERRORS = (redis.RedisError, RedisClusterException, OSError, TimeoutError)

Rewrite = Callable[[int, bytes], Awaitable[bytes]]


class LocalAnswer(web.HTTPException):
    """A complete answer the guard gives in ComfyUI's place (raised from ``check``).

    ``chain.render_errors`` re-raises HTTP exceptions below 400 or with ``empty_body`` set
    untouched instead of rendering them as proxy errors; ``empty_body`` here only means "do not
    add aiohttp's default text", the JSON payload (if any) is sent as given.
    """

    empty_body = True

    def __init__(self, status: int, payload: object | None = None) -> None:
        self.status_code = status
        if payload is None:
            super().__init__()
        else:
            super().__init__(text=orjson.dumps(payload).decode(), content_type="application/json")


class ReadGuard:
    """What the per-operation read guards share: their collaborators, built once
    (``app.build_routes``), and the caller's checks. Stateless but for a cache of prompts
    whose files were already recorded and the tenants' views."""

    name = "isolation"

    def __init__(
        self,
        *,
        roles: Mapping[str, RoleSettings],
        isolation: IsolationSettings,
        ownership: OwnershipStore,
        metrics: Metrics,
        forward: Handler,
        own_views: OwnViews | None = None,
        placeholder_key: bytes | None = None,
    ) -> None:
        """``forward``: the route's terminal handler (a full read of a paged view goes there
        with the paging removed); ``own_views``: shared by the history and jobs guards."""
        self._roles = roles
        self._isolation = isolation
        self._ownership = ownership
        self._metrics = metrics
        self._forward = forward
        self._key = placeholder_key or secrets.token_bytes(32)
        """Keys the queue placeholders (stable for the process, not reversible)."""
        self._recorded: OrderedDict[str, None] = OrderedDict()
        self._views = own_views or OwnViews()
        """Tenants' history and jobs views from their own prompts (proxy.isolation.own_views)."""

    def _tenant(self, ctx: RequestContext) -> str | None:
        """The caller's owner name when its view is narrowed; None: isolation off, or an admin
        (who sees everything unfiltered)."""
        if not self._isolation.enabled:
            return None
        principal = ctx.principal
        if principal is None:  # pragma: no cover - AuthGuard runs first
            raise Forbidden("not authenticated", error_type="forbidden")
        return None if principal.is_admin(self._roles) else principal.comfy_user

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        """Each operation's guard decides (see the subclasses)."""
        raise NotImplementedError

    def _degraded(self, ctx: RequestContext, view: str, exc: BaseException) -> None:
        _degraded(self._metrics, ctx, view, exc)

    # -- history --------------------------------------------------------------------------
    async def _history(self, request: web.Request, ctx: RequestContext, owner: str) -> None:
        ownership = self._ownership
        if request.method == "POST":
            body = await read_json_body(request, ctx)
            if not isinstance(body, dict):
                return  # not reached: the body guard refused it (proxy.request.bodies)
            # SECURITY: ComfyUI deletes/wipes anyone's entries; only the caller's ids go on.
            # A non-admin's clear is normally refused by RoleGuard already; if a role is let
            # through (allow_routes), it still only clears its own entries here.
            rewritten = views.history_delete_body(body, await ownership.prompts_of(owner))
            if rewritten is not None:
                await self._unindex_deleted(request, ownership, owner, body, rewritten["delete"])
            self._replace_body(ctx, rewritten)
            return
        if request.method not in ("GET", "HEAD"):
            return
        max_items = offset = None
        paged = False
        if ctx.path == "/history":
            max_items = views.parse_int(views.query_value(ctx.upstream_path, "max_items"))
            offset = views.parse_int(views.query_value(ctx.upstream_path, "offset"))
            paged = _valid_ints(ctx.upstream_path, HISTORY_PAGING)

        records = record_cache(ownership, request.app[SETTINGS].isolation.retention_seconds)

        async def rewrite(status: int, body: bytes) -> bytes:
            if status != 200:
                return body
            answer = _loads(body)
            try:
                # A short answer (/history/{id}): its own records decide, one round trip.
                found = await own_entries(ownership, owner, answer, records)
                owned = await ownership.prompts_of(owner) if found is None else ()
            except STATE_ERRORS as exc:
                self._degraded(ctx, "history", exc)
                return b"{}"  # ComfyUI's answer for unknown ids: nothing shown, nothing leaked
            mine = views.filter_history(answer, owned) if found is None else found[0]
            await self._record_history_files(ownership, owner, mine)
            shown = await _sent_client_ids(ownership, list(mine)) if found is None else found[1]
            for entry in mine.values():
                views.show_client_id(views.entry_extra_data(entry), shown)
            return orjson.dumps(views.history_window(mine, max_items, offset))

        if not paged:  # /history/{id}, or a non-integer ComfyUI fails on (its own 500)
            ctx.response_filters.append(rewrite)
            return

        async def full_read() -> web.StreamResponse:
            # Paging applies to the caller's own list: fetch everything, page it here.
            ctx.upstream_path = views.without_query_params(ctx.upstream_path, HISTORY_PAGING)
            ctx.response_filters.append(rewrite)
            return await self._forward(request)

        async def record_files(history: dict[str, Any]) -> None:
            await self._record_history_files(ownership, owner, history)

        async def own_history(request: web.Request) -> web.StreamResponse:
            try:
                return await self._views.history(
                    request,
                    owner,
                    max_items=max_items,
                    offset=offset,
                    fallback=full_read,
                    record_files=record_files,
                )
            except STATE_ERRORS as exc:
                self._degraded(ctx, "history", exc)
                return _json(request, {})

        ctx.answer = own_history

    @staticmethod
    async def _unindex_deleted(
        request: web.Request,
        ownership: OwnershipStore,
        owner: str,
        body: dict[str, Any],
        ids: list[str],
    ) -> None:
        """Deleted history entries leave their owner's view index (the ids a ``delete`` names
        are entries the client saw in history). A clear deletes every own id, also those still
        queued or running, which are not in history yet (ComfyUI's delete is a no-op for them):
        those stay, as ComfyUI's queue lists them now."""
        if body.get("clear"):
            queue = await fetch_queue(request)
            in_flight = {*views.queue_ids(queue, "queue_running")}
            in_flight.update(views.queue_ids(queue, "queue_pending"))
            named = {i for i in body.get("delete") or () if isinstance(i, str)}
            ids = [i for i in ids if i in named or i not in in_flight]
        await ownership.unindex(owner, ids)

    async def _record_history_files(
        self, ownership: OwnershipStore, owner: str, history: dict[str, Any]
    ) -> None:
        """Record the previews of the caller's finished prompts once per process (history is
        polled by the UI; entries do not change once finished).

        SECURITY: only files of the prompt's own preview nodes, as its record (written from the
        forwarded graph) names them; every other file dict of an entry is the node's word
        (``Preview3D`` echoes its inputs) and never the caller's (proxy.tenancy.attribution).
        """
        files: list[FileRef] = []
        for prompt_id, entry in history.items():
            if prompt_id in self._recorded or not isinstance(entry, dict):
                continue
            self._recorded[prompt_id] = None
            outputs = entry.get("outputs")
            if not any(ref[0] == "temp" for ref in views.output_files(outputs)):
                continue  # nothing that could be a preview: no record to read
            record = await ownership.prompt(prompt_id)
            if record is not None and record.owner == owner:
                files.extend(attributed_outputs(outputs, record.previews))
        while len(self._recorded) > RECORDED_CACHE_SIZE:
            self._recorded.popitem(last=False)
        if files:
            await ownership.record_files(owner, files)

    # -- queue ----------------------------------------------------------------------------
    async def _queue(self, request: web.Request, ctx: RequestContext, owner: str) -> None:
        ownership = self._ownership
        if request.method == "POST":
            body = await read_json_body(request, ctx)
            if not isinstance(body, dict):
                return  # not reached: the body guard refused it (proxy.request.bodies)
            owned = await ownership.prompts_of(owner)
            own_pending: list[str] = []
            if body.get("clear"):
                # SECURITY: ComfyUI's clear empties everyone's pending prompts; a tenant's
                # clear deletes its own pending ones (as listed by ComfyUI right now).
                queue = await fetch_queue(request)
                own_pending = [p for p in views.queue_ids(queue, "queue_pending") if p in owned]
            self._replace_body(ctx, views.queue_delete_body(body, owned, own_pending))
            return
        if request.method not in ("GET", "HEAD"):
            return
        key = self._key

        async def rewrite(status: int, body: bytes) -> bytes:
            if status != 200:
                return body
            owned: Collection[str]
            try:
                owned = await ownership.prompts_of(owner)
            except STATE_ERRORS as exc:
                # Whose items are whose cannot be read: every item as a placeholder (the
                # queue's length and positions stay useful, nothing of anyone is shown).
                self._degraded(ctx, "queue", exc)
                owned = ()
            queue = views.redact_queue(_loads(body), owned, key)
            own_items = [
                item
                for section in views.EMPTY_QUEUE
                for item in queue[section]
                if isinstance(item, list)
                and len(item) > 1
                and isinstance(item[1], str)
                and item[1] in owned
            ]
            shown = await _sent_client_ids(ownership, [item[1] for item in own_items])
            for item in own_items:
                views.show_client_id(views.item_extra_data(item), shown)
            return orjson.dumps(queue)

        ctx.response_filters.append(rewrite)

    # -- jobs -----------------------------------------------------------------------------
    async def _jobs(self, request: web.Request, ctx: RequestContext, owner: str) -> None:
        ownership = self._ownership
        segments = ctx.path.split("/")[2:]  # "/jobs/<id>/cancel" -> ["<id>", "cancel"]
        method = request.method
        if not segments:  # the list
            if method in ("GET", "HEAD"):
                self._jobs_list(request, ctx, ownership, owner)
            return
        if segments == ["cancel"] and method == "POST":
            await self._jobs_cancel_many(request, ctx, ownership, owner)
            return
        job_id = segments[0]
        if not job_id:
            return  # "/api/jobs/": no such route, ComfyUI's own 404
        record = await ownership.prompt(job_id)
        if record is None or record.owner != owner:
            # SECURITY: someone else's job answers exactly like an unknown one, and ComfyUI
            # never hears of it.
            if segments[1:] == ["cancel"]:
                raise _answer(ctx, 200, {"cancelled": False})
            raise _answer(ctx, 404, JOB_NOT_FOUND)
        if len(segments) == 1 and method in ("GET", "HEAD"):
            mine = record

            async def rewrite(status: int, body: bytes) -> bytes:
                if status == 200:
                    job = _loads(body)
                    outputs = job.get("outputs") if isinstance(job, dict) else None
                    # SECURITY: the prompt's own previews only (see _record_history_files).
                    files = list(attributed_outputs(outputs, mine.previews))
                    if files:
                        await ownership.record_files(owner, files)
                    extra_data = views.job_extra_data(job)
                    shown = views.sent_client_ids([mine])
                    if isinstance(extra_data, dict) and extra_data.get("client_id") in shown:
                        views.show_client_id(extra_data, shown)
                        return orjson.dumps(job)
                return body

            ctx.response_filters.append(rewrite)

    def _jobs_list(
        self, request: web.Request, ctx: RequestContext, ownership: OwnershipStore, owner: str
    ) -> None:
        query = views.jobs_query(ctx.upstream_path)
        page = views.jobs_page_params(ctx.upstream_path)
        offset, limit = page if page is not None else (0, None)

        def filtered(own: Callable[[], Awaitable[Collection[str]]]) -> Rewrite:
            async def rewrite(status: int, body: bytes) -> bytes:
                if status != 200:
                    return body  # e.g. ComfyUI's own 400 for bad parameters
                return orjson.dumps(views.filter_jobs(_loads(body), await own(), offset, limit))

            return rewrite

        async def owned() -> Collection[str]:
            return await ownership.prompts_of(owner)

        async def nothing() -> Collection[str]:
            return ()

        if query is None:  # ComfyUI refuses the parameters: its own 400, from ComfyUI
            ctx.response_filters.append(filtered(owned))
            return

        async def full_read() -> web.StreamResponse:
            # Totals must count the caller's jobs only: fetch the whole list, page it here.
            ctx.upstream_path = views.without_query_params(ctx.upstream_path, JOBS_PAGING)
            ctx.response_filters.append(filtered(owned))
            return await self._forward(request)

        async def probe() -> web.StreamResponse:
            # No prompt of the caller: ComfyUI's answer for one job of anyone's, emptied (its
            # own answer where it has no /api/jobs).
            path = views.without_query_params(ctx.upstream_path, JOBS_PAGING)
            ctx.upstream_path = views.with_query_param(path, "limit", "1")
            ctx.response_filters.append(filtered(nothing))
            return await self._forward(request)

        async def own_jobs(request: web.Request) -> web.StreamResponse:
            try:
                return await self._views.jobs(request, owner, query, full_read, probe)
            except STATE_ERRORS as exc:
                self._degraded(ctx, "jobs", exc)
                return _json(request, views.jobs_answer([], query))

        ctx.answer = own_jobs

    async def _jobs_cancel_many(
        self, request: web.Request, ctx: RequestContext, ownership: OwnershipStore, owner: str
    ) -> None:
        body = await read_json_body(request, ctx)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(ids, list):
            return  # ComfyUI answers 400 itself
        kept = views.jobs_cancel_ids(ids, await ownership.prompts_of(owner))
        if not kept:
            raise _answer(ctx, 200, {"cancelled": False})
        ctx.body = orjson.dumps({**body, "job_ids": kept})

    # -- interrupt ------------------------------------------------------------------------
    async def _interrupt(self, request: web.Request, ctx: RequestContext, owner: str) -> None:
        body = await read_json_body(request, ctx)
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        ownership = self._ownership
        if prompt_id:
            record = await ownership.prompt(prompt_id) if isinstance(prompt_id, str) else None
            if record is None or record.owner != owner:
                # SECURITY: ComfyUI would interrupt it if it is running; for anyone but its
                # owner this is ComfyUI's no-op answer for an id that is not running.
                raise _answer(ctx, 200)
            return
        # SECURITY: a bare interrupt stops whatever runs; a tenant may only stop its own.
        running = views.queue_ids(await fetch_queue(request), "queue_running")
        for candidate in running:
            record = await ownership.prompt(candidate)
            if record is not None and record.owner == owner:
                ctx.body = orjson.dumps({"prompt_id": candidate})
                return
        raise _answer(ctx, 200)

    # -- websocket ------------------------------------------------------------------------
    def _websocket(self, ctx: RequestContext, principal: Principal, *, admin: bool) -> None:
        owner = principal.comfy_user
        # ComfyUI treats an empty clientId as none and mints one; so do we, so the client's id
        # (told in the status sid) is known here and maps to a namespaced one.
        client_id = views.query_value(ctx.upstream_path, "clientId") or uuid.uuid4().hex
        namespaced = upstream_client_id(owner, client_id)
        # SECURITY: ComfyUI lets any socket claim any clientId; upstream only ever sees ids
        # derived from (owner, client id), so another user's id cannot be claimed.
        ctx.upstream_path = views.with_query_param(ctx.upstream_path, "clientId", namespaced)
        ctx.frame_filters.append(
            SocketEventFilter(
                owner=owner,
                client_id=client_id,
                upstream_client_id=namespaced,
                ownership=self._ownership,
                passed_types=self._isolation.passed_event_types,
                admin=admin,
                metrics=self._metrics,
            )
        )

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _replace_body(ctx: RequestContext, rewritten: dict[str, Any] | None) -> None:
        """Forward ``rewritten`` instead of the client's body; None: answer ComfyUI's 200
        without reaching it (nothing of the caller's to act on)."""
        if rewritten is None:
            raise _answer(ctx, 200)
        ctx.body = orjson.dumps(rewritten)


class HistoryGuard(ReadGuard):
    """``/history``, ``/history/{id}`` (see the module docstring)."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if (owner := self._tenant(ctx)) is not None:
            await self._history(request, ctx, owner)


class QueueGuard(ReadGuard):
    """``/queue`` (see the module docstring)."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if (owner := self._tenant(ctx)) is not None:
            await self._queue(request, ctx, owner)


class JobsGuard(ReadGuard):
    """``/api/jobs`` and below (see the module docstring)."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if (owner := self._tenant(ctx)) is not None:
            await self._jobs(request, ctx, owner)


class InterruptGuard(ReadGuard):
    """``POST /interrupt`` (see the module docstring)."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if request.method == "POST" and (owner := self._tenant(ctx)) is not None:
            await self._interrupt(request, ctx, owner)


class SocketGuard(ReadGuard):
    """``/ws``: every socket's client id namespaced, admins' too; frames filtered."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if not self._isolation.enabled:
            return
        principal = ctx.principal
        if principal is None:  # pragma: no cover - AuthGuard runs first
            raise Forbidden("not authenticated", error_type="forbidden")
        self._websocket(ctx, principal, admin=principal.is_admin(self._roles))


def _degraded(metrics: Metrics, ctx: RequestContext, view: str, exc: BaseException) -> None:
    """A tenant's view answered without the ownership store (Redis down): reads fail open to
    an answer that shows nothing of anyone, never closed to a 503 and never unfiltered."""
    ctx.response_headers.append((DEGRADED_HEADER, DEGRADED_STATE))
    metrics.redis_errors.labels("view_" + view, "degraded").inc()
    log.warning(
        "isolation_view_degraded",
        request_id=ctx.request_id,
        view=view,
        error=type(exc).__name__,
    )


def _json(request: web.Request, payload: object) -> web.Response:
    """A view the guard answers itself (JSON, like ComfyUI's)."""
    body = orjson.dumps(payload)
    request[CONTEXT].bytes_out = len(body)
    return web.Response(body=body, content_type="application/json")


async def _sent_client_ids(ownership: OwnershipStore, prompt_ids: list[str]) -> dict[str, str]:
    """The client ids the owner's prompts were sent with, keyed by the namespaced ones (what
    the owner's views show instead: ``views.show_client_id``)."""
    if not prompt_ids:
        return {}
    try:
        return views.sent_client_ids(await ownership.records(prompt_ids))
    except STATE_ERRORS:
        return {}  # the namespaced ids stay: the owner's own entries, merely less familiar


async def fetch_queue(request: web.Request) -> object:
    """ComfyUI's ``GET /queue`` answer (who runs, who waits), fetched by the proxy itself.

    Raises:
        UpstreamUnavailable: ComfyUI is unreachable or did not answer with JSON.
        UnreadableAnswer: its answer came in an encoding the proxy cannot read.
        UpstreamTimeout: ComfyUI went silent.
    """
    pool = request.app[POOL]
    if pool.managed or len(pool.upstreams) > 1:  # several instances: who runs where
        return await fetch_merged_queue(request, request.app[MULTI])
    upstream = pool.pick()
    limit = int(request.app[SETTINGS].server.max_inspected_body_mb * 1024 * 1024)
    try:
        async with pool.session.get(
            upstream.url_for("/queue"),
            headers={hdrs.HOST: upstream.host_header, hdrs.ACCEPT_ENCODING: IDENTITY},
        ) as resp:
            status = resp.status
            body = await read_client_answer(
                resp, limit=limit, upstream=upstream.name, metrics=request.app[METRICS]
            )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise map_client_error(exc, upstream, request) from None
    if status != 200:
        raise UpstreamUnavailable(f"ComfyUI's queue answered {status}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamUnavailable("ComfyUI's queue answer is not JSON") from None


def _answer(ctx: RequestContext, status: int, payload: object | None = None) -> LocalAnswer:
    """A local answer; the log line names this guard (ComfyUI never saw the request)."""
    ctx.rejected_by = ReadGuard.name
    return LocalAnswer(status, payload)


def _loads(body: bytes) -> object:
    """The JSON of an upstream answer; None (filtered to an empty view) when it is not JSON."""
    merged = parsed_answer(body)  # several instances: the merged answer, already parsed
    if merged is not None:
        return merged
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _valid_ints(raw_path: str, names: Collection[str]) -> bool:
    """Whether every present parameter of ``names`` parses as ComfyUI's ``int()`` does; if not,
    the query goes upstream unchanged so the client gets ComfyUI's own error."""
    return all(
        (value := views.query_value(raw_path, name)) is None or views.parse_int(value) is not None
        for name in names
    )


__all__ = [
    "HistoryGuard",
    "InterruptGuard",
    "JobsGuard",
    "LocalAnswer",
    "QueueGuard",
    "ReadGuard",
    "SocketGuard",
    "fetch_queue",
]
