"""The jobs API under ``{base}/comfygate/v1/`` (documented by ``openapi.json``, served there).

Every route but the OpenAPI document runs the ComfyUI chain's front guards (origin, auth,
CSRF, role, rate limit; wired by route name in ``app.build_guards``). A job is a prompt: it is
submitted through the ``POST /prompt`` chain itself (:mod:`proxy.jobs.internal`), so it passes
every guard a prompt passes (policy, idempotency, placement, isolation, queue quota and the
gateway queue). Jobs are the caller's own: another user's job id is answered exactly as an
unknown one (404 ``job_not_found``), whether it is read, waited on, streamed or cancelled.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import orjson
import structlog
from aiohttp import hdrs, web

from proxy.errors import BadRequest, NotFound, ProxyError
from proxy.jobs.cache import ResultCache, cache_key
from proxy.jobs.internal import run_internal
from proxy.jobs.live import LiveWatcher
from proxy.jobs.live_store import LiveJobs
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.status import TERMINAL, JobState, read_state
from proxy.jobs.store import JobRecord, JobStore
from proxy.jobs.templates import Template, TemplateStore
from proxy.jobs.view import API_PREFIX, job_view
from proxy.jobs.watcher import JobWatcher
from proxy.jobs.webhooks.destinations import Destinations, WebhookRefused
from proxy.principal import Principal
from proxy.settings import SETTINGS
from proxy.settings.jobs import JobsSettings
from proxy.state import CONTEXT
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.pool import POOL

log = structlog.get_logger("comfygate.jobs")

OPENAPI_ROUTE: Final = "jobs_api_openapi"
ROUTES: Final = (
    "jobs_api_templates",
    "jobs_api_template",
    "jobs_api_jobs",
    "jobs_api_job",
    "jobs_api_events",
    "jobs_api_preview",
)
"""Route names (and rule names) of the guarded routes: ``app.build_guards`` wires them."""
_BODY_KEYS: Final = frozenset({"template", "params", "workflow", "webhook"})


@dataclass(slots=True)
class Jobs:
    """Everything the jobs API shares (``app[JOBS]``)."""

    settings: JobsSettings
    templates: TemplateStore
    store: JobStore
    metrics: JobMetrics
    cache: ResultCache
    counted_ends: set[str]
    """Jobs whose end this process recorded already (saves the watcher's idempotent calls)."""
    watcher: JobWatcher
    destinations: Destinations
    live: LiveJobs
    """The live event stream's view of running jobs (node, progress, latest preview)."""
    live_watcher: LiveWatcher


JOBS: web.AppKey[Jobs] = web.AppKey("comfygate.jobs")


class JobNotFound(NotFound):
    error_type = "job_not_found"

    def __init__(self) -> None:
        super().__init__("no such job")


def _principal(request: web.Request) -> Principal:
    principal = request[CONTEXT].principal
    if principal is None:  # pragma: no cover - the auth guard runs first on these routes
        raise ProxyError("not authenticated", error_type="unauthenticated", status=401)
    return principal


def _is_admin(request: web.Request, principal: Principal) -> bool:
    return principal.is_admin(request.app[SETTINGS].roles)


def _base(request: web.Request) -> str:
    return request.app[SETTINGS].server.base_path


# -- OpenAPI -----------------------------------------------------------------------------------


async def openapi(request: web.Request) -> web.Response:
    """``GET /comfygate/v1/openapi.json``: the hand-written document, servers set to here."""
    text = resources.files("proxy.jobs").joinpath("openapi.json").read_text(encoding="utf-8")
    spec = orjson.loads(text)
    spec["servers"] = [{"url": f"{_base(request)}{API_PREFIX}"}]
    return web.json_response(spec, dumps=lambda v: orjson.dumps(v).decode())


# -- templates ---------------------------------------------------------------------------------


def _visible(request: web.Request, principal: Principal, template: Template | None) -> bool:
    return template is not None and template.allowed(principal, request.app[SETTINGS].roles)


async def list_templates(request: web.Request) -> web.Response:
    principal = _principal(request)
    jobs = request.app[JOBS]
    items = [t.summary() for t in jobs.templates.all() if _visible(request, principal, t)]
    return web.json_response({"templates": items})


async def get_template(request: web.Request) -> web.Response:
    principal = _principal(request)
    template = request.app[JOBS].templates.get(request.match_info["name"])
    if template is None or not _visible(request, principal, template):
        # A template the caller may not use is as unknown as a missing one.
        raise NotFound("no such template", error_type="template_not_found")
    return web.json_response({**template.summary(), "params": template.params_schema()})


# -- jobs --------------------------------------------------------------------------------------


def _job_view(
    request: web.Request, job_id: str, record: JobRecord | None, state: JobState
) -> dict[str, Any]:
    return job_view(_base(request), job_id, record, state)


async def find_job(request: web.Request, job_id: str) -> tuple[JobRecord | None, str]:
    """The caller's job ``job_id``: its jobs-API record (None for a prompt submitted with
    ``POST /prompt``) and the instance it is on.

    Raises:
        JobNotFound: unknown, or not the caller's (the same answer: nothing tells them apart).
    """
    principal = _principal(request)
    if not 0 < len(job_id) <= 128:
        raise JobNotFound()
    owner = principal.comfy_user
    admin = _is_admin(request, principal)
    record = await request.app[JOBS].store.get(job_id)
    if record is not None:
        # SECURITY: only the submitter (or an admin) learns that the job exists.
        if record.owner != owner and not admin:
            raise JobNotFound()
        return record, record.upstream
    ownership = request.app.get(OWNERSHIP)
    if request.app[SETTINGS].isolation.enabled and ownership is not None:
        # A prompt submitted with plain POST /prompt: isolation's record says whose it is.
        prompt = await ownership.prompt(job_id)
        if prompt is not None and (prompt.owner == owner or admin):
            return None, prompt.upstream
    raise JobNotFound()


async def current_state(
    request: web.Request, job_id: str, record: JobRecord | None, upstream: str
) -> JobState:
    jobs = request.app[JOBS]
    source = record.cache_hit_of if record is not None and record.cache_hit_of else job_id
    state = await read_state(request.app[POOL], upstream, source, _base(request))
    if state.status in TERMINAL and record is not None and job_id not in jobs.counted_ends:
        # Seen ending here first: webhook, cache and count now (the watcher would, later).
        await jobs.watcher.ended(record, state)
        jobs.counted_ends.add(job_id)
        if len(jobs.counted_ends) > 100_000:
            jobs.counted_ends.clear()  # a bounded memory; ended() again is harmless
    if state.status == "running":
        state.progress = await jobs.live.progress(job_id)
    return state


def _wait_seconds(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadRequest("wait must be a number of seconds >= 0", error_type="invalid_wait")
    return min(value, request.app[JOBS].settings.max_wait_seconds)


async def wait_for_end(
    request: web.Request,
    job_id: str,
    record: JobRecord | None,
    upstream: str,
    seconds: float,
    *,
    on_state: Callable[[JobState], Awaitable[None]] | None = None,
) -> JobState:
    """Re-read the job every ``jobs.poll_seconds`` until it ends or ``seconds`` pass."""
    poll = request.app[JOBS].settings.poll_seconds
    deadline = time.monotonic() + seconds
    while True:
        state = await current_state(request, job_id, record, upstream)
        if on_state is not None:
            await on_state(state)
        left = deadline - time.monotonic()
        if state.status in TERMINAL or left <= 0:
            return state
        await asyncio.sleep(min(poll, left))


def _job_response(view: dict[str, Any], *, done: bool) -> web.Response:
    return web.json_response(
        view,
        status=200 if done else 202,
        dumps=lambda v: orjson.dumps(v).decode(),
        headers={hdrs.LOCATION: view["links"]["self"]},
    )


async def _read_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise BadRequest(
            "send the job as JSON (Content-Type: application/json)", error_type="invalid_job"
        )
    try:
        raw = await request.read()
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", error_type="invalid_job") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", error_type="invalid_job")
    return body


def _refused(answer_status: int, body: bytes, headers: Any) -> web.Response:
    """A refusal of the prompt chain, passed on as it was (ComfyUI's shape, node_errors)."""
    kept = {k: v for k, v in headers.items() if k.lower() in ("retry-after", "content-type")}
    return web.Response(status=answer_status, body=body, headers=kept)


async def submit_job(request: web.Request) -> web.StreamResponse:
    """``POST /jobs``: ``{"template", "params"}`` or ``{"workflow"}``."""
    principal = _principal(request)
    app = request.app
    jobs = app[JOBS]
    wait = _wait_seconds(request)
    body = await _read_object(request)
    unknown = sorted(set(body) - _BODY_KEYS)
    if unknown:
        raise BadRequest(
            f"unknown members: {', '.join(unknown)}",
            error_type="invalid_job",
            extra={"unknown": unknown},
        )
    has_template, has_workflow = "template" in body, "workflow" in body
    if has_template == has_workflow:
        raise BadRequest("give either template (with params) or workflow", error_type="invalid_job")
    template: Template | None = None
    if has_template:
        name = body["template"]
        template = jobs.templates.get(name) if isinstance(name, str) else None
        if template is None or not _visible(request, principal, template):
            raise NotFound("no such template", error_type="template_not_found")
        workflow = template.render(body.get("params"))
        kind = "template"
    else:
        if "params" in body:
            raise BadRequest("params go with a template", error_type="invalid_job")
        if not jobs.settings.raw_workflows:
            raise ProxyError(
                "this server runs templates only", error_type="workflows_disabled", status=403
            )
        workflow = body["workflow"]
        if not isinstance(workflow, dict):
            raise BadRequest("workflow must be an API-format object", error_type="invalid_job")
        kind = "workflow"
    owner = principal.comfy_user
    webhook = await _webhook_url(jobs, body.get("webhook"), template)
    key = ""
    if template is not None and template.cache is not None:
        key = cache_key(template, workflow, owner, isolated=app[SETTINGS].isolation.enabled)
        hit = await jobs.cache.lookup(key)
        jobs.metrics.cache.labels("hit" if hit is not None else "miss").inc()
        if hit is not None:
            return await _cache_hit(request, jobs, principal, template, hit, webhook=webhook)
    # The live sockets first: ComfyUI sends a prompt's events only to a socket already open.
    await jobs.live_watcher.prepare(owner)
    answer = await run_internal(
        request,
        hdrs.METH_POST,
        "/prompt",
        {"prompt": workflow, "client_id": jobs.live_watcher.client_id},
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    data = answer.json()
    prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
    if answer.status != 200 or not isinstance(prompt_id, str):
        jobs.metrics.submitted.labels(kind, "refused").inc()
        log.info("job_refused", user=owner, kind=kind, status=answer.status)
        return _refused(answer.status, answer.body, answer.headers)
    replayed = answer.headers.get("Idempotent-Replayed") == "true"
    record = await jobs.store.get(prompt_id) if replayed else None
    if record is None:
        upstream = answer.context.upstream or app[POOL].home().name
        record = JobRecord(
            id=prompt_id,
            owner=owner,
            upstream=upstream,
            created_at=time.time(),
            template=template.name if template is not None else "",
            cache_key=key,
            cache_ttl=template.cache.ttl_seconds if key and template and template.cache else 0.0,
            webhook=webhook,
        )
        await jobs.store.put(record, jobs.settings.retention_seconds)
        await jobs.watcher.follow(record)  # its end is recorded with no client waiting
        jobs.metrics.submitted.labels(kind, "accepted").inc()
        log.info("job_submitted", job=prompt_id, user=owner, kind=kind, template=record.template)
    state = (
        await wait_for_end(request, prompt_id, record, record.upstream, wait)
        if wait
        else JobState("queued")
    )
    view = _job_view(request, prompt_id, record, state)
    return _job_response(view, done=state.status in TERMINAL)


async def _webhook_url(jobs: Jobs, raw: Any, template: Template | None) -> str:
    """The job's webhook URL (its own, else its template's; "" for none), checked now: a
    destination comfygate will not send to is refused before anything is queued (422)."""
    if raw is None:
        url: Any = template.webhook if template is not None else ""
    elif isinstance(raw, dict) and set(raw) == {"url"}:
        url = raw["url"]
    else:
        raise BadRequest('webhook must be {"url": "https://..."}', error_type="invalid_job")
    if not url:
        return ""
    settings = jobs.settings.webhooks
    try:
        if not settings.enabled or not settings.secret.get_secret_value():
            raise WebhookRefused("webhooks are not configured on this server")
        checked = jobs.destinations.check_url(url)
        await jobs.destinations.resolve(checked)  # every address it resolves to, now too
    except WebhookRefused as exc:
        jobs.metrics.webhook_refused.inc()
        log.info("webhook_url_refused", reason=exc.message)
        raise
    return str(checked)


async def _cache_hit(
    request: web.Request,
    jobs: Jobs,
    principal: Principal,
    template: Template,
    hit: tuple[str, str],
    *,
    webhook: str,
) -> web.Response:
    """A new job whose outputs are an earlier job's (nothing is queued)."""
    source, upstream = hit
    record = JobRecord(
        id=str(uuid.uuid4()),
        owner=principal.comfy_user,
        upstream=upstream,
        created_at=time.time(),
        template=template.name,
        cache_hit_of=source,
        webhook=webhook,
    )
    await jobs.store.put(record, jobs.settings.retention_seconds)
    jobs.metrics.submitted.labels("template", "cached").inc()
    log.info("job_cache_hit", job=record.id, source=source, user=record.owner)
    state = await current_state(request, record.id, record, upstream)
    return _job_response(_job_view(request, record.id, record, state), done=True)


async def get_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    wait = _wait_seconds(request)
    record, upstream = await find_job(request, job_id)
    state = await wait_for_end(request, job_id, record, upstream, wait)
    view = _job_view(request, job_id, record, state)
    return web.json_response(view, dumps=lambda v: orjson.dumps(v).decode())


async def list_jobs(request: web.Request) -> web.Response:
    """``GET /jobs``: the caller's jobs-API jobs, newest first, ``?limit=&before=`` pages."""
    principal = _principal(request)
    jobs = request.app[JOBS]
    try:
        limit = int(request.query.get("limit", "20"))
        before_raw = request.query.get("before")
        before = float(before_raw) if before_raw is not None else None
    except ValueError:
        raise BadRequest(
            "limit must be an integer, before a timestamp", error_type="invalid_page"
        ) from None
    if not 1 <= limit <= jobs.settings.page_size or (
        before is not None and not math.isfinite(before)
    ):
        raise BadRequest(f"limit must be 1..{jobs.settings.page_size}", error_type="invalid_page")
    records = await jobs.store.page(principal.comfy_user, before, limit + 1)
    more = len(records) > limit
    records = records[:limit]
    states = await asyncio.gather(*(current_state(request, r.id, r, r.upstream) for r in records))
    items = [_job_view(request, r.id, r, s) for r, s in zip(records, states, strict=True)]
    return web.json_response(
        {"jobs": items, "next_before": records[-1].created_at if more and records else None},
        dumps=lambda v: orjson.dumps(v).decode(),
    )


async def cancel_job(request: web.Request) -> web.Response:
    """``DELETE /jobs/{id}``: a queued job is deleted from the queue, a running one interrupted
    (ComfyUI's own requests, through the chain: isolation judges them again)."""
    job_id = request.match_info["id"]
    jobs = request.app[JOBS]
    record, upstream = await find_job(request, job_id)
    state = await current_state(request, job_id, record, upstream)
    if state.status in TERMINAL or (record is not None and record.cache_hit_of):
        jobs.metrics.cancels.labels("finished").inc()
        raise ProxyError("the job has already ended", error_type="job_finished", status=409)
    if state.status == "queued":
        answer = await run_internal(request, hdrs.METH_POST, "/queue", {"delete": [job_id]})
    else:
        answer = await run_internal(request, hdrs.METH_POST, "/interrupt", {"prompt_id": job_id})
    if answer.status != 200:
        jobs.metrics.cancels.labels("refused").inc()
        return _refused(answer.status, answer.body, answer.headers)
    jobs.metrics.cancels.labels("cancelled").inc()
    log.info("job_cancel_requested", job=job_id, was=state.status)
    state = await current_state(request, job_id, record, upstream)
    return _job_response(_job_view(request, job_id, record, state), done=state.status in TERMINAL)


async def jobs_collection(request: web.Request) -> web.StreamResponse:
    if request.method == hdrs.METH_POST:
        return await submit_job(request)
    if request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
        return await list_jobs(request)
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])


async def job_item(request: web.Request) -> web.StreamResponse:
    if request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
        return await get_job(request)
    if request.method == hdrs.METH_DELETE:
        return await cancel_job(request)
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "DELETE"])


__all__ = [
    "API_PREFIX",
    "JOBS",
    "ROUTES",
    "JobNotFound",
    "Jobs",
    "current_state",
    "find_job",
]
