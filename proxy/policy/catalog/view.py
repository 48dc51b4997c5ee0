"""What the UI offers: ComfyUI's catalog routes answered for the caller's role.

The stock frontend builds its node library from ``GET /object_info`` and its model pickers from
the combo lists in it, ``/embeddings`` and ``/experiment/models/{folder}``; API clients use
``/models/{folder}``. A role sees only the node types its policy allows and, in every list, only
the models it allows, judged by the same ``RolePolicy`` the workflow checker uses, so the UI
never offers what ``/prompt`` would refuse.

Routes (rules ``object_info`` and ``models``; GET and HEAD, anything else is forwarded):

- ``/object_info``: from the cache (``cache``), one filtered copy per (policy version,
  role); ``/object_info/{class}``: from the same cache, ``{}`` (ComfyUI's own answer for a
  class it does not know) when the class is not allowed.
- ``/models/{folder}``, ``/embeddings``, ``/experiment/models/{folder}``: forwarded, the JSON
  list filtered (not cached: ComfyUI answers them quickly).
- ``/experiment/models/preview/{folder}/{i}/{name}``: ComfyUI's empty 404 for a model the
  caller may not see, else forwarded.
- ``/models``, ``/experiment/models`` (folder lists, no model names): forwarded untouched.

Unrestricted principals (admins, or everyone with ``policy.enabled = false``) get ComfyUI's
own bytes (``/object_info`` from the cache, the lists forwarded as is). Answers keep ComfyUI's
status and content type, are gzip encoded when the client accepts it, and carry a weak ETag
(``If-None-Match`` -> 304) and ``Cache-Control: private, no-cache``: they depend on who asks.

Errors: ComfyUI's error answers pass unchanged (never cached); once a copy of ``/object_info``
exists, a failed refresh keeps serving it (the UI keeps working while ComfyUI restarts). An
answer that should carry a list but cannot be parsed is never passed on (502
``upstream_bad_catalog``): unfiltered, it would show what the role may not see.

Several instances (issue 8; ``multi.is_multi``, and no guard chose an instance): answers are
built from every reachable instance (``pool.reachable()``, home first), then filtered as above:

- ``/object_info``: the union of the instances' cached copies (``catalog_union``), one filtered
  copy per (policy version, role, union generation); an instance without a copy is fetched and
  waited for at most ``upstream.merge_timeout_seconds``, one that fails is left out
  (``Comfygate-Degraded`` names it).
- ``/object_info/{class}``: from that union too (not forwarded to one instance): the same node
  definition ``/object_info`` shows, combo options of every instance, ``{}`` when no instance
  has the class (or the role may not see it).
- ``/models/{folder}``, ``/embeddings``, ``/experiment/models/{folder}``: asked of every
  reachable instance in parallel (``merge.ask``, per-instance timeout), lists united; an
  unknown folder (ComfyUI's 404 everywhere) passes as ComfyUI's answer.
- previews and folder lists: the home instance, as everything else.

Modules of :mod:`proxy.policy.catalog`: ``upstream`` (the caches and the fetch), ``cache`` (one
instance's cache), ``union`` (several instances), ``filter`` (pure filters), ``http`` (ETag,
gzip, responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import orjson
import structlog
from aiohttp import hdrs, web

from proxy.errors import Unauthenticated, UpstreamTimeout, UpstreamUnavailable
from proxy.multi.dispatch import is_multi
from proxy.multi.merge import (
    DEGRADED_HEADER,
    MERGED,
    Gathered,
    ask,
    instance_headers,
    json_response,
)
from proxy.multi.merge import Answer as MergedAnswer
from proxy.observability.metrics import METRICS
from proxy.policy.catalog.cache import Answer, CatalogNotJson, Snapshot, render
from proxy.policy.catalog.filter import (
    allows_model,
    filter_model_entries,
    filter_model_names,
    folder_names,
    single_class,
)
from proxy.policy.catalog.http import answer_response, is_json, send_rendered
from proxy.policy.catalog.union import Copies, gather_snapshots, union_entries, union_names
from proxy.policy.catalog.upstream import (
    CATALOG,
    TRANSPORT_ERRORS,
    Catalog,
    catalog_context,
    fetch_answer,
)
from proxy.policy.model import RolePolicy
from proxy.policy.store import POLICY
from proxy.relay.forward import forward_http
from proxy.relay.home import home_for
from proxy.relay.outgoing import build_upstream_headers, map_client_error
from proxy.settings import SETTINGS
from proxy.state import CONTEXT, RequestContext
from proxy.upstream.headers import client_response_headers
from proxy.upstream.pool import POOL, Upstream

log = structlog.get_logger("comfygate.catalog")

CATALOG_RULES = frozenset({"object_info", "models"})
"""Route rules (``proxy.routes``) whose requests :func:`serve_catalog` answers."""
_NOT_FORWARDED = (
    # The answer is read, so it is asked for whole and fresh: a 206 or 304 could not be
    # filtered (SECURITY). Accept-Encoding passes: ComfyUI encodes as it would, the proxy
    # decodes to read and encodes its answer the same way.
    hdrs.EXPECT,
    hdrs.CONTENT_LENGTH,
    hdrs.TRANSFER_ENCODING,
    hdrs.RANGE,
    hdrs.IF_RANGE,
    hdrs.IF_NONE_MATCH,
    hdrs.IF_MODIFIED_SINCE,
    hdrs.IF_MATCH,
    hdrs.IF_UNMODIFIED_SINCE,
)


async def serve_catalog(request: web.Request) -> web.StreamResponse:
    """Terminal handler of the ``object_info`` and ``models`` rules (see the module doc)."""
    ctx = request[CONTEXT]
    if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
        return await forward_http(request)
    segments = [unquote(s) for s in ctx.path.split("/")[1:]]
    if segments == ["object_info"]:
        return await _object_info(request, ctx)
    policy = _policy(request, ctx)
    upstreams = _several(request, ctx)
    if upstreams:
        union = await _serve_union(request, ctx, segments, policy, upstreams)
        if union is not None:
            return union
    if policy is None:  # unrestricted: ComfyUI's own answer, byte for byte
        return await forward_http(request)
    match segments:
        case ["object_info", class_type] if class_type:
            return await _forward_filtered(
                request, ctx, dict, lambda info: single_class(info, class_type, policy)
            )
        case ["models", _] | ["embeddings"] | ["experiment", "models", _] if (
            policy.allows_every_model
        ):
            return await forward_http(request)
        case ["models", folder]:
            return await _forward_filtered(
                request, ctx, list, lambda names: filter_model_names(names, folder, policy)
            )
        case ["embeddings"]:
            return await _forward_filtered(
                request, ctx, list, lambda names: filter_model_names(names, "embeddings", policy)
            )
        case ["experiment", "models", folder]:
            return await _forward_filtered(
                request, ctx, list, lambda entries: filter_model_entries(entries, folder, policy)
            )
        case ["experiment", "models", "preview", folder, _index, *name] if name:
            if not allows_model(policy, "/".join(name), folder_names(folder)):
                return web.Response(status=404)  # ComfyUI's answer for a model it lacks
    return await forward_http(request)


def _policy(request: web.Request, ctx: RequestContext) -> RolePolicy | None:
    """The caller's effective policy (its ``key`` and ``version`` name its cached copy), or
    None when it may use everything (unrestricted role, or the policy is off)."""
    principal = ctx.principal
    if principal is None:  # the auth guard runs before every ComfyUI route
        raise Unauthenticated("no principal")
    store = request.app[POLICY]
    if not store.enabled:
        return None
    policy = store.for_principal(principal)
    return None if policy.unrestricted else policy


def _several(request: web.Request, ctx: RequestContext) -> list[Upstream]:
    """The instances a multi-instance answer is built from (the reachable ones, home first),
    or none: a single instance, a guard chose one (``ctx.target``), or none is reachable (the
    home instance then answers, or fails, as with one instance)."""
    pool = request.app[POOL]
    if ctx.target is not None or not is_multi(pool):
        return []
    upstreams = pool.reachable()
    if pool.settings.home:
        upstreams.sort(key=lambda u: u.name != pool.settings.home)  # stable: home first
    return upstreams


async def _object_info(request: web.Request, ctx: RequestContext) -> web.StreamResponse:
    policy = _policy(request, ctx)
    upstreams = _several(request, ctx)
    if upstreams:
        return await _union_object_info(request, ctx, policy, upstreams)
    upstream = ctx.target or request.app[POOL].home()
    cache = request.app[CATALOG].cache(upstream)
    version = request.app[POLICY].version
    snapshot = cache.snapshot
    if snapshot is None:
        outcome = "miss"
        ctx.upstream = upstream.name
        started = time.perf_counter()
        # The miss is this client's request: its path (no query) and its Comfy-User.
        miss = (ctx.upstream_path.partition("?")[0], ctx.upstream_headers)
        try:
            current = await cache.current(version, miss)
        finally:
            ctx.upstream_seconds = time.perf_counter() - started
    else:
        stale = cache.clock() - snapshot.fetched_at >= cache.ttl
        outcome = "stale" if stale else "hit"
        current = await cache.current(version)
    if isinstance(current, Answer):  # ComfyUI's error, not cached
        request.app[METRICS].catalog_answers.labels("passthrough").inc()
        return answer_response(request, ctx, current)
    request.app[METRICS].catalog_answers.labels(outcome).inc()
    if policy is None:
        rendered = current.raw
    else:
        rendered = cache.copy_for(current, policy, policy.version, policy.key)
    return await send_rendered(request, ctx, rendered, compressed=current.compressed)


async def _union_object_info(
    request: web.Request,
    ctx: RequestContext,
    policy: RolePolicy | None,
    upstreams: list[Upstream],
) -> web.StreamResponse:
    union = await _union_snapshot(request, ctx, upstreams)
    if isinstance(union, web.StreamResponse):
        return union
    snapshot, copies, missing = union
    if policy is None:
        rendered = snapshot.raw
    else:
        rendered = copies.copy_for(snapshot, policy, policy.version, policy.key)
    response = await send_rendered(request, ctx, rendered, compressed=snapshot.compressed)
    _degraded(response, missing)
    return response


async def _union_snapshot(
    request: web.Request, ctx: RequestContext, upstreams: list[Upstream]
) -> tuple[Snapshot, Copies, list[str]] | web.StreamResponse:
    """The catalog of several instances: ``(snapshot, its copies, instances left out)``, or
    the answer to send when no instance has a copy (ComfyUI's error, passed through)."""
    app = request.app
    catalog = app[CATALOG]
    miss = (ctx.upstream_path.partition("?")[0], ctx.upstream_headers)
    gathered = await gather_snapshots(
        [(u.name, catalog.cache(u)) for u in upstreams],
        app[POLICY].version,
        miss,
        within=app[SETTINGS].upstream.merge_timeout_seconds,
    )
    ctx.upstream_seconds = gathered.seconds
    if gathered.missing:
        log.warning("catalog_instances_left_out", upstreams=gathered.missing)
    if not gathered.parts:
        ctx.upstream = upstreams[0].name
        failure = gathered.failure
        if isinstance(failure, Answer):
            app[METRICS].catalog_answers.labels("passthrough").inc()
            return answer_response(request, ctx, failure)
        if failure is not None:
            raise failure
        raise UpstreamTimeout("no ComfyUI instance sent its /object_info in time")
    app[METRICS].catalog_answers.labels(gathered.outcome).inc()
    ctx.upstream = gathered.parts[0].name if len(gathered.parts) == 1 else MERGED
    snapshot, copies = catalog.union.view(gathered.parts)
    return snapshot, copies, gathered.missing


async def _serve_union(
    request: web.Request,
    ctx: RequestContext,
    segments: list[str],
    policy: RolePolicy | None,
    upstreams: list[Upstream],
) -> web.StreamResponse | None:
    """The routes answered from every instance (see the module doc); None for the others."""
    match segments:
        case ["object_info", class_type] if class_type:
            union = await _union_snapshot(request, ctx, upstreams)
            if isinstance(union, web.StreamResponse):
                return union
            snapshot, _, missing = union
            node = single_class(snapshot.info, class_type, policy)
            rendered = render(node, snapshot.raw.content_type)
            response = await send_rendered(request, ctx, rendered, compressed=snapshot.compressed)
            _degraded(response, missing)
            return response
        case ["models", folder]:
            return await _united_list(
                request, ctx, upstreams, union_names, _names_filter(folder, policy)
            )
        case ["embeddings"]:
            return await _united_list(
                request, ctx, upstreams, union_names, _names_filter("embeddings", policy)
            )
        case ["experiment", "models", folder]:
            keep: Callable[[list[Any]], list[Any]] | None = None
            if policy is not None and not policy.allows_every_model:
                judged = policy

                def keep(entries: list[Any]) -> list[Any]:
                    return filter_model_entries(entries, folder, judged)

            return await _united_list(request, ctx, upstreams, union_entries, keep)
    return None


def _names_filter(
    folder: str, policy: RolePolicy | None
) -> Callable[[list[Any]], list[Any]] | None:
    if policy is None or policy.allows_every_model:
        return None
    judged = policy
    return lambda names: filter_model_names(names, folder, judged)


async def _united_list(
    request: web.Request,
    ctx: RequestContext,
    upstreams: list[Upstream],
    unite: Callable[[list[list[Any]]], list[Any]],
    keep: Callable[[list[Any]], list[Any]] | None,
) -> web.StreamResponse:
    """A model list asked of every instance at once, the lists united, then ``keep`` (the
    caller's filter; None: unrestricted). An instance that fails, is too slow or sends no list
    is left out (``Comfygate-Degraded``); with no list at all, the first instance's answer
    passes as it is (ComfyUI's 404 for an unknown folder), and without any answer, 502."""
    started = time.perf_counter()
    base = instance_headers(request, upstreams[0])
    for name in _NOT_FORWARDED:  # SECURITY: a 206 or 304 could not be filtered
        base.popall(name, None)
    answers = await asyncio.gather(
        *(
            # GET even for HEAD: the lists are read, and HEAD gets the same headers.
            ask(
                request,
                u,
                hdrs.METH_GET,
                ctx.upstream_path,
                headers=instance_headers(request, u, base),
            )
            for u in upstreams
        )
    )
    lists: list[list[Any]] = []
    missing: list[Upstream] = []
    others: list[MergedAnswer] = []
    for upstream, answer in zip(upstreams, answers, strict=True):
        if answer is None:
            missing.append(upstream)
            continue
        if answer.status != 200:
            others.append(answer)
            continue
        parsed = answer.json() if is_json(answer.headers.get(hdrs.CONTENT_TYPE, "")) else None
        if isinstance(parsed, list):
            lists.append(parsed)
        else:
            # SECURITY: an unreadable list cannot be filtered: it is not passed on.
            log.warning("catalog_list_not_json", upstream=upstream.name)
            missing.append(upstream)
    gathered = Gathered([], missing, time.perf_counter() - started)
    if not lists:
        if others:
            first = others[0]
            ctx.upstream = first.upstream.name
            ctx.upstream_seconds = gathered.seconds
            ctx.bytes_out = len(first.body)
            return web.Response(
                status=first.status,
                headers=client_response_headers(first.headers),
                body=first.body,
            )
        if answers and any(a is not None for a in answers):
            raise CatalogNotJson("no ComfyUI instance sent a model list that is JSON")
        raise UpstreamUnavailable("no ComfyUI instance answered")
    united = unite(lists)
    body = orjson.dumps(united if keep is None else keep(united))
    return json_response(request, gathered, 200, body)


def _degraded(response: web.StreamResponse, missing: list[str]) -> None:
    if missing:
        response.headers[DEGRADED_HEADER] = ", ".join(missing)


async def _forward_filtered(
    request: web.Request,
    ctx: RequestContext,
    shape: type[list[Any]] | type[dict[str, Any]],
    keep: Callable[[Any], Any],
) -> web.StreamResponse:
    """Forward the request (as GET) and send ComfyUI's answer with its successful JSON body of
    ``shape`` replaced by ``keep(body)``; other answers (404 for an unknown folder, errors)
    pass as they are."""
    pool = request.app[POOL]
    upstream = ctx.target or home_for(request)  # another instance while home is down
    ctx.upstream = upstream.name
    headers = build_upstream_headers(request, ctx, upstream)
    for name in _NOT_FORWARDED:
        headers.popall(name, None)
    limit = request.app[CATALOG].max_bytes
    started = time.perf_counter()
    try:
        # GET even for HEAD: the Content-Length of the unfiltered list would tell its size.
        answer = await fetch_answer(
            pool, upstream, ctx.upstream_path, list(headers.items()), limit=limit
        )
    except TRANSPORT_ERRORS as exc:
        raise map_client_error(exc, upstream, request) from None
    finally:
        ctx.upstream_seconds = time.perf_counter() - started
    if not 200 <= answer.status < 300:
        return answer_response(request, ctx, answer)
    # SECURITY: every success carries a list (or a node): filtered, or not sent at all.
    parsed: Any = None
    if is_json(answer.content_type):
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed = orjson.loads(answer.body)
    if not isinstance(parsed, shape):
        raise CatalogNotJson(f"ComfyUI at {upstream.name} sent a catalog answer that is not JSON")
    return answer_response(request, ctx, answer, orjson.dumps(keep(parsed)))


__all__ = ["CATALOG_RULES", "Catalog", "catalog_context", "serve_catalog"]
