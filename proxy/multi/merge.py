"""Several ComfyUI instances seen as one: asking them all at once, and merging their answers.

Two halves:

* :func:`ask` / :func:`ask_all`: one request to one instance (or the same request to several,
  in parallel), read whole, each bounded by ``upstream.merge_timeout_seconds``. An instance that
  fails or is slower is left out of the result (logged and counted as an upstream error):
  a slow instance degrades a merged answer, it never blocks it.
* Pure merges of ComfyUI's JSON answers (``GET /history``, ``/queue``, ``/api/jobs``,
  ``/prompt``), table-testable: each instance's answer is in ComfyUI's own shape, and so is the
  merged one, so the isolation filters (``proxy.comfy.views`` through ``ctx.response_filters``)
  apply to it unchanged.

Ordering: ComfyUI's history is in completion order (an entry is inserted when its prompt ends),
so merged history is ordered by each entry's last status-message timestamp (per instance kept
in its own order: a k-way merge). Jobs are sorted with ComfyUI's own key and order
(``sort_by``/``sort_order``), then paginated here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.comfy import views
from proxy.errors import UpstreamUnavailable
from proxy.observability.metrics import METRICS
from proxy.relay.forward import forward_http
from proxy.relay.outgoing import build_upstream_headers
from proxy.settings import SETTINGS
from proxy.state import CONTEXT
from proxy.upstream.encoding import (
    AnswerTooLarge,
    UnreadableAnswer,
    ask_identity,
    compress_for_client,
    decode,
)
from proxy.upstream.http1 import (
    UpstreamConnectError,
    UpstreamHttpError,
    UpstreamHttpTimeout,
    UpstreamResponse,
)
from proxy.upstream.pool import POOL, Upstream

if TYPE_CHECKING:
    from proxy.multi.dispatch import MultiInstance

log = structlog.get_logger("comfygate.merge")

MERGED = "*"
"""``ctx.upstream`` of an answer built from several instances (a bounded metrics label)."""
DEGRADED_HEADER = "Comfygate-Degraded"
"""Names the instances left out of a merged answer (failed or too slow)."""
JOB_SORT_KEYS = ("created_at", "execution_duration")


@dataclass(frozen=True, slots=True)
class Answer:
    """One instance's whole answer."""

    upstream: Upstream
    status: int
    headers: CIMultiDictProxy[str]
    """ComfyUI's headers, without ``Content-Encoding`` and ``Content-Length`` (``body`` is
    decoded)."""
    body: bytes
    """Identity-encoded (``proxy.upstream.encoding``)."""

    def json(self) -> object:
        """The body as JSON; None when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


@dataclass(slots=True)
class Gathered:
    """The answers of a fan-out, in the order the instances were asked, and who is missing."""

    answers: list[Answer]
    missing: list[Upstream]
    seconds: float


def instance_headers(
    request: web.Request, upstream: Upstream, base: CIMultiDict[str] | None = None
) -> CIMultiDict[str]:
    """The client's filtered headers for ``upstream``, for an answer the proxy reads itself.

    ``base``: the same for another instance (built once per fan-out): only ``Host`` and
    ``Origin``, which name the instance, are changed.
    """
    if base is None or request.app[SETTINGS].upstream.preserve_host:
        headers = build_upstream_headers(request, request[CONTEXT], upstream)
        for name in (
            hdrs.EXPECT,
            hdrs.TRANSFER_ENCODING,
            hdrs.CONTENT_LENGTH,
            hdrs.CONTENT_ENCODING,
        ):
            headers.popall(name, None)
        ask_identity(headers)  # the proxy reads it: never compressed
        return headers
    headers = base.copy()
    headers[hdrs.HOST] = upstream.host_header
    if hdrs.ORIGIN in headers:
        headers[hdrs.ORIGIN] = upstream.origin
    return headers


async def ask(
    request: web.Request,
    upstream: Upstream,
    method: str,
    raw_path: str,
    body: bytes | None = None,
    *,
    within: float | None = None,
    headers: CIMultiDict[str] | None = None,
) -> Answer | None:
    """Send ``method raw_path`` (a raw path + query, as ``ctx.upstream_path``) to ``upstream``
    with the client's filtered headers, and read the whole answer (decoded, at most
    ``server.max_inspected_body_mb``).

    Returns None when the instance is unreachable, broke the exchange, did not answer within
    ``within`` seconds (default ``upstream.merge_timeout_seconds``), or sent an answer that
    cannot be read (an unknown encoding, too large); the failure is logged and counted, and
    reported to the pool's passive health check unless it was only slow or unreadable.
    """
    app = request.app
    pool = app[POOL]
    limit = within if within is not None else app[SETTINGS].upstream.merge_timeout_seconds
    max_bytes = int(app[SETTINGS].server.max_inspected_body_mb * 1024 * 1024)
    if headers is None:
        headers = instance_headers(request, upstream)
    if body is not None:
        headers = headers.copy()
        headers[hdrs.CONTENT_LENGTH] = str(len(body))
        headers[hdrs.CONTENT_TYPE] = "application/json"
    try:
        async with asyncio.timeout(limit):
            resp = await pool.http1(upstream).request(
                method, upstream.target_prefix + raw_path, list(headers.items()), body
            )
            try:
                raw = await _read_bounded(resp, max_bytes, upstream)
            finally:
                resp.release()
        payload = decode(raw, resp.headers, limit=max_bytes, upstream=upstream.name)
    except UnreadableAnswer:  # never passed on: the instance is left out
        _count_failure(request, upstream, "bad_encoding")
        return None
    except AnswerTooLarge:
        _count_failure(request, upstream, "merge_too_large")
        return None
    except TimeoutError:
        # Slow is not dead: a busy ComfyUI answers late; this answer goes on without it.
        _count_failure(request, upstream, "merge_timeout")
        return None
    except (UpstreamHttpError, OSError) as exc:
        _count_failure(request, upstream, "merge_failed", error=type(exc).__name__)
        refused = isinstance(exc, (UpstreamConnectError, ConnectionRefusedError))
        timeout = isinstance(exc, UpstreamHttpTimeout)
        pool.report_failure(
            upstream, "refused" if refused else "timeout" if timeout else "protocol"
        )
        return None
    pool.report_response(upstream, resp.status)
    headers = CIMultiDict(resp.headers)
    for name in (hdrs.CONTENT_ENCODING, hdrs.CONTENT_LENGTH):
        headers.popall(name, None)
    return Answer(upstream, resp.status, CIMultiDictProxy(headers), payload)


async def _read_bounded(resp: UpstreamResponse, limit: int, upstream: Upstream) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.read_chunk():
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(f"ComfyUI at {upstream.name}: answer too large to inspect")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _count_failure(request: web.Request, upstream: Upstream, kind: str, error: str = "") -> None:
    request.app[METRICS].upstream_errors.labels(upstream.name, kind).inc()
    log.warning(
        "instance_left_out",
        request_id=request[CONTEXT].request_id,
        upstream=upstream.name,
        kind=kind,
        error=error or None,
    )


async def ask_all(
    request: web.Request,
    upstreams: Sequence[Upstream],
    method: str,
    raw_path: str | Mapping[str, str],
    body: bytes | Mapping[str, bytes] | None = None,
) -> Gathered:
    """The same request (or one per instance, when ``raw_path``/``body`` map instance names to
    them) to every instance of ``upstreams`` at once."""
    started = time.perf_counter()

    def path_for(u: Upstream) -> str:
        return raw_path if isinstance(raw_path, str) else raw_path[u.name]

    def body_for(u: Upstream) -> bytes | None:
        return body if body is None or isinstance(body, bytes) else body.get(u.name)

    base = instance_headers(request, upstreams[0]) if upstreams else None
    results = await asyncio.gather(
        *(
            ask(
                request,
                u,
                method,
                path_for(u),
                body_for(u),
                headers=instance_headers(request, u, base),
            )
            for u in upstreams
        )
    )
    answers = [a for a in results if a is not None]
    missing = [u for u, a in zip(upstreams, results, strict=True) if a is None]
    return Gathered(answers, missing, time.perf_counter() - started)


def json_response(
    request: web.Request, gathered: Gathered, status: int, body: bytes
) -> web.Response:
    """A merged JSON answer, accounted like a forwarded one (upstream ``*``), gzip-compressed
    when the client accepts it; for HEAD the same headers and length without the body."""
    ctx = request[CONTEXT]
    ctx.upstream = MERGED
    ctx.upstream_seconds = gathered.seconds
    ctx.bytes_out = len(body)
    response = web.Response(status=status, body=body, content_type="application/json")
    if gathered.missing:
        response.headers[DEGRADED_HEADER] = ", ".join(u.name for u in gathered.missing)
    compress_for_client(request, response)
    return response


# -- pure merges ---------------------------------------------------------------------------


def entry_time(entry: object) -> float | None:
    """When a history entry's prompt ended: its last status message's ``timestamp`` (ms).
    ComfyUI appends the messages in order, so the last one carrying a timestamp is it."""
    status = entry.get("status") if isinstance(entry, dict) else None
    messages = status.get("messages") if isinstance(status, dict) else None
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
            stamp = message[1].get("timestamp")
            if isinstance(stamp, (int, float)):
                return stamp
    return None


def merge_history(histories: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One history in completion order out of several instances' (each in its own order).

    Each instance's list is kept in its own order (an entry without a timestamp sorts with the
    one before it), and the lists are interleaved by time: one sort of already sorted runs.
    An id present on several instances (a prompt re-run elsewhere) keeps its latest entry.
    """
    present = [h for h in histories if h]
    if len(present) == 1:
        return dict(present[0])
    keyed: list[tuple[float, int, int, str, Any]] = []
    for rank, history in enumerate(present):
        last = float("-inf")
        for position, (prompt_id, entry) in enumerate(history.items()):
            stamp = entry_time(entry)
            if stamp is not None and stamp > last:
                last = stamp
            keyed.append((last, rank, position, prompt_id, entry))
    keyed.sort(key=_order)
    merged: dict[str, Any] = {}
    for _, _, _, prompt_id, entry in keyed:
        merged.pop(prompt_id, None)
        merged[prompt_id] = entry
    return merged


def _order(item: tuple[float, int, int, str, Any]) -> tuple[float, int, int]:
    return item[0], item[1], item[2]


def merge_queue(queues: Iterable[object]) -> dict[str, Any]:
    """``GET /queue`` of several instances: running and pending items side by side (each
    instance's pending list stays in its heap order; the UI orders by number itself)."""
    out: dict[str, Any] = {}
    running: list[Any] = []
    pending: list[Any] = []
    for queue in queues:
        if not isinstance(queue, dict):
            continue
        for key, value in queue.items():
            out.setdefault(key, value)
        for name, into in (("queue_running", running), ("queue_pending", pending)):
            items = queue.get(name)
            if isinstance(items, list):
                into.extend(items)
    out["queue_running"] = running
    out["queue_pending"] = pending
    return out


def queue_remaining(answer: object) -> int | None:
    """``exec_info.queue_remaining`` of a ``GET /prompt`` answer or a ``status`` event's data."""
    info = answer.get("exec_info") if isinstance(answer, dict) else None
    value = info.get("queue_remaining") if isinstance(info, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def merge_prompt_info(answers: Iterable[object]) -> dict[str, Any]:
    """``GET /prompt``: ``queue_remaining`` summed over the instances."""
    total = sum(n for a in answers if (n := queue_remaining(a)) is not None)
    return {"exec_info": {"queue_remaining": total}}


def job_sort(raw_path: str) -> tuple[str, bool]:
    """``(sort_by, descending)`` of a ``GET /api/jobs`` query, ComfyUI's defaults applied."""
    sort_by = views.query_value(raw_path, "sort_by") or "created_at"
    if sort_by not in JOB_SORT_KEYS:
        sort_by = "created_at"
    return sort_by, views.query_value(raw_path, "sort_order") != "asc"


def _job_key(sort_by: str) -> Any:
    def key(job: Mapping[str, Any]) -> float:
        if sort_by == "execution_duration":
            start, end = job.get("execution_start_time"), job.get("execution_end_time")
            if isinstance(start, (int, float)) and isinstance(end, (int, float)) and start and end:
                return float(end - start)
            return 0.0
        created = job.get("create_time", 0)
        return float(created) if isinstance(created, (int, float)) else 0.0

    return key


def merge_jobs(
    answers: Iterable[object],
    *,
    sort_by: str,
    descending: bool,
    offset: int,
    limit: int | None,
) -> dict[str, Any]:
    """``GET /api/jobs`` of several instances as one list: sorted like ComfyUI sorts it, then
    paginated, ``total`` summed over the instances' totals."""
    jobs: list[dict[str, Any]] = []
    total = 0
    for answer in answers:
        if not isinstance(answer, dict):
            continue
        listed = [j for j in answer.get("jobs") or () if isinstance(j, dict)]
        jobs.extend(listed)
        pagination = answer.get("pagination")
        counted = pagination.get("total") if isinstance(pagination, dict) else None
        total += counted if isinstance(counted, int) else len(listed)
    jobs.sort(key=_job_key(sort_by), reverse=descending)
    page = jobs[offset:] if offset > 0 else jobs
    if limit is not None:
        page = page[:limit]
    return {
        "jobs": page,
        "pagination": {
            "offset": offset,
            "limit": limit,
            "total": total,
            "has_more": offset + len(page) < total,
        },
    }


# -- merged views (the handlers) -------------------------------------------------------------

HISTORY_PAGING = ("max_items", "offset")
JOBS_PAGING = ("limit", "offset")
JOB_END_STATUSES = frozenset({"failed"})


def _first_refusal(gathered: Gathered) -> Answer | None:
    """An instance's 4xx answer (bad parameters: every instance would say the same)."""
    return next((a for a in gathered.answers if 400 <= a.status < 500), None)


_PARSED: ContextVar[tuple[bytes, object] | None] = ContextVar("comfygate_merged", default=None)


def parsed_answer(body: bytes) -> object | None:
    """The object ``body`` was just serialised from, while a merged answer goes through the
    isolation rewrite: the rewrite need not parse again what the merge wrote (None otherwise)."""
    known = _PARSED.get()
    return known[1] if known is not None and known[0] is body else None


async def _finish(request: web.Request, gathered: Gathered, merged: object) -> web.StreamResponse:
    """The merged answer, through the isolation rewrite the guards set (per-user filter)."""
    ctx = request[CONTEXT]
    body = orjson.dumps(merged)
    if ctx.filters_response:
        token = _PARSED.set((body, merged))
        try:
            body = await ctx.filter_response(200, body)
        finally:
            _PARSED.reset(token)
    return json_response(request, gathered, 200, body)


def _passthrough(request: web.Request, gathered: Gathered, reply: Answer) -> web.Response:
    return json_response(request, gathered, reply.status, reply.body)


def _nothing(request: web.Request, gathered: Gathered) -> web.StreamResponse:
    """No instance gave a usable answer: its failure, or 502 when none answered at all."""
    if gathered.answers:
        return _passthrough(request, gathered, gathered.answers[0])
    raise UpstreamUnavailable("no ComfyUI instance answered")


async def merged_history(request: web.Request, state: MultiInstance) -> web.StreamResponse:
    """``GET /history[?max_items&offset]`` of every reachable instance, in completion order,
    with the prompts lost with an instance as failed entries; paging applies to the whole."""
    ctx = request[CONTEXT]
    raw = ctx.upstream_path
    max_items = views.parse_int(views.query_value(raw, "max_items"))
    offset = views.parse_int(views.query_value(raw, "offset"))
    window = any(views.query_value(raw, p) is not None for p in HISTORY_PAGING)
    if window and not all(
        (v := views.query_value(raw, p)) is None or views.parse_int(v) is not None
        for p in HISTORY_PAGING
    ):
        return await forward_http(request)  # ComfyUI's own error for a non-integer, from home
    ask_path = raw
    if window and not (max_items is not None and (offset is None or offset < 0)):
        # With an offset the window depends on every instance's whole list; the newest
        # max_items (no offset) are among each instance's newest max_items.
        ask_path = views.without_query_params(raw, HISTORY_PAGING)
    gathered = await ask_all(request, request.app[POOL].reachable(), "GET", ask_path)
    histories: list[dict[str, Any]] = []
    for reply in gathered.answers:
        history = reply.json() if reply.status == 200 else None
        if isinstance(history, dict):
            state.locations.record_history(reply.upstream.name, history)
            histories.append(history)
    if not histories:
        return _nothing(request, gathered)
    lost = {
        lost.prompt_id: lost.history_entry()
        for lost in state.lost.store.all()
        if not any(lost.prompt_id in h for h in histories)
    }
    merged = merge_history([*histories, lost])
    if window:
        merged = views.history_window(merged, max_items, offset)
    return await _finish(request, gathered, merged)


async def merged_queue(request: web.Request, state: MultiInstance) -> web.StreamResponse:
    """``GET /queue`` of every reachable instance (also refreshes the lost-prompt watch)."""
    asked_at = time.monotonic()
    gathered = await ask_all(
        request, request.app[POOL].reachable(), "GET", request[CONTEXT].upstream_path
    )
    queues: list[object] = []
    for reply in gathered.answers:
        queue = reply.json() if reply.status == 200 else None
        if isinstance(queue, dict):
            state.lost.observe_queue(reply.upstream, queue, asked_at)
            queues.append(queue)
    if not queues:
        return _nothing(request, gathered)
    return await _finish(request, gathered, merge_queue(queues))


async def fetch_merged_queue(request: web.Request, state: MultiInstance) -> dict[str, Any]:
    """The merged ``GET /queue`` as JSON, for the isolation guard's own decisions (a tenant's
    running prompt for a bare interrupt, its pending ones for a clear).

    Raises:
        UpstreamUnavailable: no instance answered.
    """
    asked_at = time.monotonic()
    gathered = await ask_all(request, request.app[POOL].reachable(), "GET", "/queue")
    queues = []
    for reply in gathered.answers:
        queue = reply.json() if reply.status == 200 else None
        if isinstance(queue, dict):
            state.lost.observe_queue(reply.upstream, queue, asked_at)
            queues.append(queue)
    if not queues:
        raise UpstreamUnavailable("no ComfyUI instance answered with its queue")
    return merge_queue(queues)


async def merged_prompt_info(request: web.Request, state: MultiInstance) -> web.StreamResponse:
    """``GET /prompt``: ``queue_remaining`` summed over the reachable instances."""
    del state
    gathered = await ask_all(
        request, request.app[POOL].reachable(), "GET", request[CONTEXT].upstream_path
    )
    answers = [a.json() for a in gathered.answers if a.status == 200]
    if not answers:
        return _nothing(request, gathered)
    return await _finish(request, gathered, merge_prompt_info(answers))


async def merged_jobs(request: web.Request, state: MultiInstance) -> web.StreamResponse:
    """``GET /api/jobs``: every instance's list, sorted like ComfyUI sorts, paginated here."""
    ctx = request[CONTEXT]
    raw = ctx.upstream_path
    page = views.jobs_page_params(raw)
    if page is None:
        return await forward_http(request)  # ComfyUI's own 400 for bad paging, from home
    offset, limit = page
    ask_path = raw
    if any(views.query_value(raw, p) is not None for p in JOBS_PAGING):
        ask_path = views.without_query_params(raw, JOBS_PAGING)
        if limit is not None:  # the page is within each instance's first offset + limit
            ask_path = views.with_query_param(ask_path, "limit", str(offset + limit))
    gathered = await ask_all(request, request.app[POOL].reachable(), "GET", ask_path)
    if (refusal := _first_refusal(gathered)) is not None:
        return _passthrough(request, gathered, refusal)  # e.g. an unknown status filter
    answers: list[object] = [a.json() for a in gathered.answers if a.status == 200]
    if not answers:
        return _nothing(request, gathered)
    listed = {
        j.get("id")
        for a in answers
        if isinstance(a, dict)
        for j in a.get("jobs") or ()
        if isinstance(j, dict)
    }
    if _lists_failed(raw):
        lost_jobs = [lost.job() for lost in state.lost.store.all() if lost.prompt_id not in listed]
        answers.append({"jobs": lost_jobs, "pagination": {"total": len(lost_jobs)}})
    sort_by, descending = job_sort(raw)
    merged = merge_jobs(answers, sort_by=sort_by, descending=descending, offset=offset, limit=limit)
    return await _finish(request, gathered, merged)


def _lists_failed(raw_path: str) -> bool:
    """Whether a jobs query would list a lost prompt (failed, no workflow filter)."""
    if views.query_value(raw_path, "workflow_id"):
        return False
    wanted = views.query_value(raw_path, "status")
    return not wanted or "failed" in {s.strip() for s in wanted.split(",")}


__all__ = [
    "DEGRADED_HEADER",
    "MERGED",
    "Answer",
    "Gathered",
    "ask",
    "ask_all",
    "entry_time",
    "fetch_merged_queue",
    "job_sort",
    "json_response",
    "merge_history",
    "merge_jobs",
    "merge_prompt_info",
    "merge_queue",
    "merged_history",
    "merged_jobs",
    "merged_prompt_info",
    "merged_queue",
    "parsed_answer",
    "queue_remaining",
]
