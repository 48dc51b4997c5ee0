"""Where the gateway queue meets requests: holding ``POST /prompt``, and the views and
cancellations of held prompts (``docs/scheduler.md``).

- :class:`HoldGuard` runs last on ``POST /prompt`` (after policy, placement, isolation and the
  queue quota: the prompt is checked, rewritten, recorded and counted as before) and holds the
  body the guards decided on. When ComfyUI has room and nothing waits before it, the request
  releases it itself, straight through, and its client gets ComfyUI's own answer
  (``Gate.admit``); otherwise it is answered at once in ComfyUI's shape (``prompt_id``,
  ``number``, ``node_errors``). Either way with ``X-Comfygate-Estimated-Wait``. What ComfyUI's
  validation would surely refuse is refused first, with ComfyUI's own 400
  (:mod:`proxy.scheduler.validate`).
- :class:`CancelGuard` runs before isolation on ``POST /queue``: ``delete`` and ``clear``
  remove the caller's held prompts (an admin's, or anyone's without isolation: every held one
  named or all); ComfyUI then gets the request as before.
- :class:`ViewGuard` runs last on ``GET /queue`` (the caller's held prompts appended to
  ``queue_pending`` in the order they will run), ``/api/jobs`` (as ``pending`` jobs; a held
  job's detail; job cancel) and ``/ws`` (``status``'s ``queue_remaining`` plus the caller's held
  prompts).

Who sees a held prompt is decided here as isolation decides for ComfyUI's queue: its owner, and
admins (everyone when isolation is off, as with ComfyUI alone). Another user's held prompt is
never shown, cancelled or answered for: its id is treated as unknown.
"""

from __future__ import annotations

import contextlib
import gzip
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson
import structlog
from aiohttp import hdrs, web

from proxy.chain import ROUTE_TABLE
from proxy.comfy.validation import Verdict
from proxy.errors import BadRequest, ServiceUnavailable
from proxy.isolation.prompt import client_id_of
from proxy.isolation.read_guard import DEGRADED_STATE
from proxy.multi.merge import DEGRADED_HEADER
from proxy.multi.placement import missing_on, requirements
from proxy.multi.placement_guard import candidate_states
from proxy.observability.metrics import role_label
from proxy.policy.catalog.upstream import CATALOG
from proxy.relay.outgoing import build_upstream_headers
from proxy.request.bodies import BodyReader, read_json_body
from proxy.request.prompt import PromptReader, forward_submission, read_prompt
from proxy.scheduler.estimates import shape_of
from proxy.scheduler.fair import Held
from proxy.scheduler.gate import STORE_ERRORS, Gate
from proxy.scheduler.notify import failed_job
from proxy.scheduler.store import Entry
from proxy.scheduler.validate import HoldValidator
from proxy.settings import Settings
from proxy.state import (
    UNDECIDED,
    FrameFilter,
    RequestContext,
    ResponseFilter,
    Undecided,
    with_quick,
)
from proxy.upstream.encoding import compress_for_client
from proxy.upstream.pool import UpstreamPool

log = structlog.get_logger("comfygate.scheduler")

WAIT_HEADER = "X-Comfygate-Estimated-Wait"
"""Seconds until the held prompt is expected to start (the owner's submit answer)."""
_NOT_KEPT = frozenset(
    h.lower()
    for h in (
        hdrs.HOST,
        hdrs.ORIGIN,
        hdrs.CONTENT_LENGTH,
        hdrs.CONTENT_TYPE,
        hdrs.TRANSFER_ENCODING,
        hdrs.CONTENT_ENCODING,
        hdrs.EXPECT,
        hdrs.CONNECTION,
        hdrs.COOKIE,
        hdrs.ACCEPT_ENCODING,
    )
)


def viewer(settings: Settings, ctx: RequestContext) -> str | None:
    """Whose held prompts the caller sees: theirs (isolation on, not an admin), or everyone's
    (None)."""
    principal = ctx.principal
    if not settings.isolation.enabled or principal is None:
        return None
    return None if principal.is_admin(settings.roles) else principal.comfy_user


def _weight(gate: Gate, ctx: RequestContext) -> float:
    weights = gate.settings.weights
    roles = ctx.principal.roles if ctx.principal is not None else frozenset()
    return max((weights.get(r, 1.0) for r in roles), default=1.0)


# -- POST /prompt ------------------------------------------------------------------------------


class HoldGuard:
    """Holds every accepted ``POST /prompt`` in the gateway queue (module doc)."""

    name = "scheduler"

    def __init__(self, gate: Gate, prompts: PromptReader) -> None:
        self._gate = gate
        self._prompts = prompts
        self._validator = HoldValidator()

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if request.method != hdrs.METH_POST or ctx.path != "/prompt":
            return
        gate = self._gate
        submission = await read_prompt(request, ctx, reader=self._prompts)
        if submission.prompt is None:
            return  # ComfyUI answers no_prompt at once
        body = submission.body
        prompt_id = body.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            # Without isolation the client may send none: the proxy sets it now, so that the
            # answer, the queue views and the release name the same prompt.
            prompt_id = str(uuid.uuid4())
            submission.body = {**body, "prompt_id": prompt_id}
            forward_submission(ctx, submission)
        assert ctx.body is not None  # forward_submission set it
        principal = ctx.principal
        owner = principal.comfy_user if principal is not None else "anonymous"
        weight = _weight(gate, ctx)
        shape = shape_of(n.class_type for n in submission.prompt.nodes.values())
        held = Held(
            prompt_id=prompt_id,
            owner=owner,
            role=role_label(principal.roles) if principal is not None else "none",
            seq=0,
            cost=gate.estimates.seconds(shape),
            weight=weight,
            front=bool(submission.body.get("front")),
            created=time.time(),
            candidates=_candidates(gate.pool, submission.prompt),
            shape=shape,
            client_id=await _sent_client_id(gate, prompt_id, body),
        )
        verdict = await self._predict(request, held.candidates, ctx.body)
        if verdict.refuses:
            await self._refuse(ctx, prompt_id, owner, verdict)
            return
        upstream = ctx.target or gate.pool.home()
        headers = tuple(
            (k, v)
            for k, v in build_upstream_headers(request, ctx, upstream).items()
            if k.lower() not in _NOT_KEPT
        )
        try:
            seq = await gate.store.next_seq()
            held = _with_seq(held, seq)
            admission = await gate.admit(Entry(held, ctx.body, headers), upstream)
            if admission is None:
                raise BadRequest(
                    "prompt_id is already in use; omit it to get a new one",
                    error_type="prompt_id_taken",
                )
        except STORE_ERRORS as exc:
            gate.metrics.unavailable.labels("hold").inc()
            if gate.settings.redis_fail_mode == "pass_through":
                log.warning("scheduler_unavailable", fail_mode="pass_through", error=str(exc))
                return  # forwarded at once, unscheduled
            await _undo(gate, prompt_id)
            log.warning("scheduler_unavailable", fail_mode="closed", error=type(exc).__name__)
            raise ServiceUnavailable(
                "the gateway queue (Redis) is unavailable; try again shortly",
                error_type="scheduler_unavailable",
                headers={hdrs.RETRY_AFTER: "1"},
            ) from None
        wait = admission.wait
        if admission.now:
            ctx.answer = _straight_through(gate, prompt_id, wait)
            return
        await gate.announce()
        await _push_status(gate, owner)
        answer = {"prompt_id": prompt_id, "number": seq, "node_errors": verdict.held_node_errors()}

        async def respond(request: web.Request) -> web.StreamResponse:
            return web.json_response(answer, headers={WAIT_HEADER: f"{wait:.1f}"})

        ctx.answer = respond

    async def _predict(
        self, request: web.Request, candidates: Sequence[str], body: bytes
    ) -> Verdict:
        """ComfyUI's answer to the prompt on the instances it may be released to
        (:mod:`proxy.scheduler.validate`)."""
        catalog = request.app.get(CATALOG)
        if catalog is None:
            return Verdict(None, unsure="no catalog")
        pool = self._gate.pool
        named = [pool.get(name) for name in candidates]
        instances = [u for u in named if u is not None] or self._gate.instances()
        return await self._validator.verdict(catalog, instances, body)

    async def _refuse(
        self, ctx: RequestContext, prompt_id: str, owner: str, verdict: Verdict
    ) -> None:
        """Refused as ComfyUI would have refused it: nothing held, its ownership record and
        quota count undone, ComfyUI's 400 body."""
        await _undo(self._gate, prompt_id)
        answer = verdict.answer()
        error_type = str(answer["error"]["type"])
        self._prompts.metrics.prompt_refusals.labels(error_type).inc()
        log.info(
            "prompt_refused_at_hold",
            request_id=ctx.request_id,
            user=owner,
            reason=error_type,
            nodes=sorted(answer["node_errors"]),
        )

        async def respond(request: web.Request) -> web.StreamResponse:
            return web.json_response(answer, status=400)

        ctx.answer = respond


def _straight_through(
    gate: Gate, prompt_id: str, wait: float
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The answer of a prompt released by its own request (``Gate.claim_now``): the route's
    own terminal handler forwards it (placement, failover, response filters: pass-through
    exactly), and the queue follows ComfyUI's answer."""

    async def respond(request: web.Request) -> web.StreamResponse:
        forward = request.app[ROUTE_TABLE].terminal("prompt")
        try:
            response = await forward(request)
        except BaseException:
            with contextlib.suppress(*STORE_ERRORS):
                await gate.answered_now(prompt_id, None)
            raise
        try:
            await gate.answered_now(prompt_id, response.status)
        except STORE_ERRORS as exc:
            # Left claimed: the lease lapses and a feeder finds ComfyUI has it (never resent).
            log.warning("scheduler_store_unavailable", op="answered", error=type(exc).__name__)
        if response.status == 200 and not response.prepared:
            response.headers[WAIT_HEADER] = f"{wait:.1f}"
        return response

    return respond


def _with_seq(held: Held, seq: int) -> Held:
    return replace(held, seq=seq)


def _candidates(pool: UpstreamPool, graph: Any) -> tuple[str, ...]:
    """The instances able to run the graph (several instances); () when any can."""
    if not pool.managed:
        return ()
    req = requirements(graph)
    return tuple(c.name for c in candidate_states(pool) if not missing_on(req, c.capabilities))


async def _sent_client_id(gate: Gate, prompt_id: str, body: Mapping[str, Any]) -> str:
    """The client id the client sent (isolation forwards a namespaced one, recorded)."""
    if gate.ownership is not None:  # isolation on (scheduler_context)
        record = await gate.ownership.prompt(prompt_id)
        if record is not None:
            return record.sent_client_id or ""
    sent = client_id_of(body)
    return sent if isinstance(sent, str) else ""


async def _undo(gate: Gate, prompt_id: str) -> None:
    """A prompt that cannot be held is not queued: its record and count go (best effort)."""
    try:
        if gate.ownership is not None:  # isolation on (scheduler_context)
            await gate.ownership.forget_prompt(prompt_id)
        quota = gate.quota
        if quota is not None:
            await quota.release([prompt_id], reason="refused")
    except STORE_ERRORS:
        log.warning("scheduler_undo_failed", prompt_id=prompt_id)


# -- POST /queue -------------------------------------------------------------------------------


class CancelGuard:
    """``POST /queue`` ``delete``/``clear`` remove held prompts too (module doc)."""

    name = "scheduler"

    def __init__(self, gate: Gate, settings: Settings, bodies: BodyReader) -> None:
        self._gate = gate
        self._settings = settings
        self._bodies = bodies

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        gate = self._gate
        if request.method != hdrs.METH_POST or ctx.path != "/queue":
            return
        body = await read_json_body(request, ctx, self._bodies)
        owner = viewer(self._settings, ctx)
        if body.get("clear"):
            removed = await gate.store.cancel(None, owner)
        elif isinstance(ids := body.get("delete"), list):
            removed = await gate.store.cancel([i for i in ids if isinstance(i, str)], owner)
        else:
            return
        await _cancelled(gate, removed, owner)


async def _cancelled(gate: Gate, removed: Sequence[str], owner: str | None) -> None:
    if removed:
        gate.metrics.releases.labels("cancelled").inc(len(removed))
        log.info("scheduler_cancelled", count=len(removed))
        gate.wake()
        await _push_status(gate, owner)


async def _push_status(gate: Gate, owner: str | None) -> None:
    """The owner's sockets here hear the change of what they wait for (ComfyUI's queue did
    not change: it sends nothing)."""
    if gate.notifier is None:
        return
    try:
        await gate.notifier.status(owner, gate.store.count)
    except STORE_ERRORS:
        log.warning("scheduler_status_push_failed")


# -- views -------------------------------------------------------------------------------------


class ViewGuard:
    """Held prompts in ``GET /queue``, ``/api/jobs`` and ``status`` events (module doc)."""

    name = "scheduler"

    def __init__(self, gate: Gate, settings: Settings) -> None:
        self._gate = gate
        self._settings = settings

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        gate = self._gate
        rule = ctx.rule.name
        owner = viewer(self._settings, ctx)
        if rule == "queue" and request.method == hdrs.METH_GET:
            ctx.response_filters.append(_queue_view(gate, ctx, owner))
        elif rule == "jobs":
            try:
                await self._jobs(request, ctx, gate, owner)
            except STORE_ERRORS as exc:
                if request.method != hdrs.METH_GET:
                    raise  # a cancel that cannot reach the held prompts is not answered done
                _view_degraded(gate, ctx, "jobs", exc)
        elif rule == "history" and request.method == hdrs.METH_GET:
            try:
                await _history(ctx, gate, owner)
            except STORE_ERRORS as exc:
                _view_degraded(gate, ctx, "history", exc)
        elif rule == "ws":
            ctx.frame_filters.append(_status_filter(gate, owner))

    async def _jobs(
        self, request: web.Request, ctx: RequestContext, gate: Gate, owner: str | None
    ) -> None:
        segments = ctx.path.split("/")[2:]  # "/jobs/<id>/cancel" -> ["<id>", "cancel"]
        if request.method == hdrs.METH_GET and not segments:
            _wrap_jobs_list(ctx, gate, owner, request.query)
            return
        if request.method == hdrs.METH_GET and len(segments) == 1:
            held = await _visible(gate, segments[0], owner)
            if held is not None:
                job = _job(held, detail=True) | await _detail(gate, held)
                ctx.answer = _static(job)
            elif (failed := (await gate.store.failed(owner)).get(segments[0])) is not None:
                ctx.answer = _static(failed_job(segments[0], failed, detail=True))
            return
        if request.method == hdrs.METH_POST and segments == ["cancel"]:
            try:
                ids = orjson.loads(ctx.body or b"{}").get("job_ids")
            except (orjson.JSONDecodeError, AttributeError):
                return
            if isinstance(ids, list):
                removed = await gate.store.cancel([i for i in ids if isinstance(i, str)], owner)
                await _cancelled(gate, removed, owner)
                if removed:
                    ctx.response_filters.append(_force_cancelled())
            return
        if request.method == hdrs.METH_POST and len(segments) == 2 and segments[1] == "cancel":
            removed = await gate.store.cancel([segments[0]], owner)
            await _cancelled(gate, removed, owner)
            if removed:
                ctx.answer = _static({"cancelled": True})


def _view_degraded(gate: Gate, ctx: RequestContext, view: str, exc: BaseException) -> None:
    """A read answered without the gateway queue's part (Redis down): what ComfyUI (or
    isolation) answers, marked degraded as isolation marks its own, never a 503 for a read."""
    if (DEGRADED_HEADER, DEGRADED_STATE) not in ctx.response_headers:
        ctx.response_headers.append((DEGRADED_HEADER, DEGRADED_STATE))
    gate.metrics.unavailable.labels("view").inc()
    log.warning(
        "scheduler_view_degraded",
        request_id=ctx.request_id,
        view=view,
        error=type(exc).__name__,
    )


async def _visible(gate: Gate, prompt_id: str, owner: str | None) -> Held | None:
    entry = await gate.store.entry(prompt_id)
    if entry is None or (owner is not None and entry.held.owner != owner):
        return None
    held_ids = {h.prompt_id for h in await gate.store.held(entry.held.owner)}
    return entry.held if prompt_id in held_ids else None


def _static(payload: object) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.json_response(payload)

    return respond


def _job(held: Held, *, detail: bool = False, number: int | None = None) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": held.prompt_id,
        "status": "pending",
        "priority": held.seq if number is None else number,
        "create_time": int(held.created * 1000),
        "outputs_count": 0,
        "previewable_outputs_count": 0,
    }
    return job


async def _detail(gate: Gate, held: Held) -> dict[str, Any]:
    entry = await gate.store.entry(held.prompt_id)
    extra: dict[str, Any] = {}
    prompt: object = {}
    if entry is not None:
        body = orjson.loads(entry.body)
        prompt = body.get("prompt", {})
        extra = _shown_extra(body, held)
    wait = await gate.expected_wait(held.owner, held.weight, held.shape)
    return {
        "workflow": {"prompt": prompt, "extra_data": extra},
        "estimated_wait_seconds": round(wait, 1),
        "gateway_queue": {
            "position": await _position(gate, held),
            "estimated_seconds": round(gate.estimates.seconds(held.shape), 1),
        },
    }


async def _position(gate: Gate, held: Held) -> int:
    mine = await gate.store.held(held.owner)
    return next((i for i, h in enumerate(mine) if h.prompt_id == held.prompt_id), 0)


def _shown_extra(body: Mapping[str, Any], held: Held) -> dict[str, Any]:
    extra = body.get("extra_data")
    extra = dict(extra) if isinstance(extra, dict) else {}
    if held.client_id:
        extra["client_id"] = held.client_id
    else:
        extra.pop("client_id", None)
    return extra


def _queue_view(gate: Gate, ctx: RequestContext, owner: str | None) -> ResponseFilter:
    async def rewrite(status: int, body: bytes) -> bytes:
        if status != 200:
            return body
        try:
            queue = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if not isinstance(queue, dict) or not isinstance(queue.get("queue_pending"), list):
            return body
        try:
            return orjson.dumps(await _with_held(gate, queue, owner))
        except STORE_ERRORS as exc:
            _view_degraded(gate, ctx, "queue", exc)
            return body

    return rewrite


async def _with_held(gate: Gate, queue: dict[str, Any], owner: str | None) -> dict[str, Any]:
    """ComfyUI's queue with the caller's held prompts after its pending ones."""
    listed = [*queue.get("queue_running", []), *queue["queue_pending"]]
    numbers = [i[0] for i in listed if isinstance(i, list) and i and _is_number(i[0])]
    base = int(max(numbers, default=-1)) + 1
    for offset, held in enumerate(await gate.store.held(owner)):
        entry = await gate.store.entry(held.prompt_id)
        if entry is None:
            continue
        sent = orjson.loads(entry.body)
        queue["queue_pending"].append(
            [
                base + offset,
                held.prompt_id,
                sent.get("prompt", {}),
                _shown_extra(sent, held),
                [],
            ]
        )
    return queue


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


async def _history(ctx: RequestContext, gate: Gate, owner: str | None) -> None:
    """Prompts ComfyUI refused at release time, as the failed entries ComfyUI keeps for
    prompts that failed: ``/history/{id}`` answers the entry, ``/history`` lists them too."""
    failed = await gate.store.failed(owner)
    if not failed:
        return
    segments = ctx.path.split("/")[2:]
    if len(segments) == 1:
        if segments[0] in failed:
            ctx.answer = _static({segments[0]: failed[segments[0]]})
        return

    async def add(payload: object) -> object:
        return {**payload, **failed} if isinstance(payload, dict) else payload

    _wrap_json(ctx, add)


def _wrap_json(ctx: RequestContext, add: Callable[[object], Awaitable[object]]) -> None:
    """``add`` applied to the JSON a 200 answer carries, whether a guard answers (isolation's
    own views) or ComfyUI does."""
    inner_answer = ctx.answer
    if inner_answer is not None:

        async def answer(request: web.Request) -> web.StreamResponse:
            response = await inner_answer(request)
            if not isinstance(response, web.Response) or response.status != 200:
                return response
            raw = response.body
            if not isinstance(raw, bytes):
                return response
            # Small answers arrive already gzipped for this client (compress_for_client
            # compresses them itself); the view is ours, so it is read and compressed again.
            coding = response.headers.get(hdrs.CONTENT_ENCODING)
            if coding not in (None, "gzip"):
                return response
            try:
                payload = orjson.loads(gzip.decompress(raw) if coding else raw)
            except (orjson.JSONDecodeError, OSError, EOFError, zlib.error):
                return response
            # The same response with the new body: its status, headers and compression (the
            # answer's own, for this client's Accept-Encoding) stay as they were.
            response.body = orjson.dumps(await add(payload))
            if coding:
                del response.headers[hdrs.CONTENT_ENCODING]
                compress_for_client(request, response)
            return response

        ctx.answer = answer
        return

    async def rewrite(status: int, body: bytes) -> bytes:
        if status != 200:
            return body
        try:
            return orjson.dumps(await add(orjson.loads(body)))
        except orjson.JSONDecodeError:
            return body

    ctx.response_filters.append(rewrite)


def _wrap_jobs_list(
    ctx: RequestContext, gate: Gate, owner: str | None, query: Mapping[str, str]
) -> None:
    wanted = {s.strip() for s in query.get("status", "").split(",") if s.strip()}
    if wanted and not wanted & {"pending", "failed"}:
        return
    if query.get("offset", "0") not in ("", "0"):
        return  # held jobs are the newest: on the first page only

    async def add(payload: object) -> object:
        if not isinstance(payload, dict) or not isinstance(payload.get("jobs"), list):
            return payload
        try:
            held = await _jobs_of(gate, owner, wanted, payload["jobs"])
        except STORE_ERRORS as exc:
            _view_degraded(gate, ctx, "jobs", exc)
            return payload
        if not held:
            return payload
        payload["jobs"] = [*held, *payload["jobs"]]
        page = payload.get("pagination")
        if isinstance(page, dict) and isinstance(page.get("total"), int):
            page["total"] += len(held)
        return payload

    _wrap_json(ctx, add)


async def _jobs_of(
    gate: Gate, owner: str | None, wanted: set[str], listed_jobs: list[Any]
) -> list[dict[str, Any]]:
    """The gateway queue's jobs for a list: held ones (pending), then refused ones (failed)
    the list does not have yet."""
    held = [_job(h) for h in await gate.store.held(owner)] if _wants(wanted, "pending") else []
    if _wants(wanted, "failed"):
        listed = {j.get("id") for j in listed_jobs if isinstance(j, dict)}
        failed = await gate.store.failed(owner)
        held += [
            failed_job(p, e, detail=False) for p, e in reversed(failed.items()) if p not in listed
        ]
    return held


def _wants(wanted: set[str], status: str) -> bool:
    return not wanted or status in wanted


def _force_cancelled() -> ResponseFilter:
    async def rewrite(status: int, body: bytes) -> bytes:
        return orjson.dumps({"cancelled": True}) if status == 200 else body

    return rewrite


def _status_filter(gate: Gate, owner: str | None) -> FrameFilter:
    """``status`` frames count what the caller waits for: ComfyUI's queue (at most the room
    the gate gives each instance) plus the caller's held prompts."""

    def quick(frame: str | bytes) -> str | bytes | Undecided | None:
        if isinstance(frame, str) and '"status"' in frame:
            return UNDECIDED  # counted by the full call
        return frame

    async def status(frame: str | bytes) -> str | bytes | None:
        if not isinstance(frame, str) or '"status"' not in frame:
            return frame
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return frame
        info = _exec_info(message)
        if info is None:
            return frame
        if gate.notifier is not None:
            gate.notifier.comfy_remaining = int(info["queue_remaining"])
        try:
            held = await gate.store.count(owner)
        except STORE_ERRORS:
            return frame
        info["queue_remaining"] = int(info["queue_remaining"]) + held
        return orjson.dumps(message).decode()

    return with_quick(status, quick)


def _exec_info(message: object) -> dict[str, Any] | None:
    if not isinstance(message, dict) or message.get("type") != "status":
        return None
    data = message.get("data")
    status = data.get("status") if isinstance(data, dict) else None
    info = status.get("exec_info") if isinstance(status, dict) else None
    if isinstance(info, dict) and _is_number(info.get("queue_remaining")):
        return info
    return None


__all__ = ["WAIT_HEADER", "CancelGuard", "HoldGuard", "ViewGuard", "viewer"]
