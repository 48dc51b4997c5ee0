"""Sticky routing: everything about one prompt goes to the instance that runs it.

With several instances each ComfyUI only knows its own prompts and files, so a request about
one of them must reach that instance:

==============================================  =============================================
``GET /history/{id}``                           the prompt's instance (``PromptRecord.upstream``);
                                                unknown to the proxy: asked of every instance
``GET /api/jobs/{id}``, ``POST …/{id}/cancel``  the prompt's instance (unknown: every instance)
``POST /interrupt`` with ``prompt_id``          the prompt's instance; an unknown id goes to every
                                                instance (a no-op where it does not run);
                                                without one (admins; tenants get their running
                                                prompt's id from the isolation guard): every
                                                instance, as ComfyUI's interrupt stops whatever
                                                runs
``POST /queue``, ``POST /history``              ``delete`` split per instance; ``clear`` to all
``POST /api/jobs/cancel``                       ``job_ids`` split per instance
``GET /view`` (``output``/``temp``)             the instance that produced the file (learnt from
                                                history, job details and ``executed`` events);
                                                the caller's own prompt's instance first (see
                                                :class:`FileLocations`); unknown: the first
                                                instance that has it (HEAD asked of all at
                                                once); ``input`` files (uploads, shared inputs,
                                                present on every instance): home
==============================================  =============================================

A prompt whose instance became unavailable and that was reported lost answers as a failed
prompt (:mod:`proxy.multi.lost`); one whose instance is merely unreachable answers like an
unknown one (``{}``, ``Job not found``), with the ``Comfygate-Degraded`` header naming it.

Isolation decisions (others' ids, files) are made by the isolation guards before this runs;
their answer rewrites (``ctx.response_filters``) are applied to what is answered here too.
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.comfy import views
from proxy.comfy.records import FileRef, PromptRecord
from proxy.multi.merge import Answer, Gathered, ask_all, json_response
from proxy.relay.forward import forward_http
from proxy.request.bodies import read_json_body
from proxy.state import CONTEXT, RequestContext
from proxy.tenancy.files import PathRefused, clean_relative, view_target
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.pool import POOL, Upstream

if TYPE_CHECKING:
    from proxy.multi.dispatch import MultiInstance

MAX_LOCATIONS = 200_000
RECORDED_PROMPTS = 20_000
JOB_NOT_FOUND = b'{"error": "Job not found"}'
PROBE_DROPPED_PARAMS = ("preview", "channel")
"""``/view`` parameters that make ComfyUI re-encode the image: not needed to find the file."""

Rewrite = Callable[[int, bytes], Awaitable[bytes]]


class FileLocations:
    """Which instance holds each output or temp file, as last learnt (bounded, in memory).

    Each ComfyUI numbers its outputs on its own, so one name (``output/ComfyUI_00001_.png``)
    can exist on two instances with different images: two admins' prompts (not moved under
    ``users/<owner>/``), previews in ``temp/``, or one user's prompts on two instances. A
    location learnt from a prompt whose owner is known (its ownership record; the socket of
    its ``executed`` event, which ComfyUI only sends to the submitter's client id) is also kept
    *per owner*, and :meth:`get` prefers the caller's own: a user's ``/view`` reaches the
    instance of their own prompt that produced the file, whoever else produced the same name
    later. Without an owner (a prompt the proxy did not record) the last location learnt wins.

    Each proxy replica learns locations from what it relays; a miss costs one parallel
    ``HEAD /view`` to every instance, so replicas need not share this.
    """

    def __init__(self, max_entries: int = MAX_LOCATIONS) -> None:
        self._max = max_entries
        self._where: OrderedDict[FileRef, str] = OrderedDict()
        self._owned: OrderedDict[tuple[str, FileRef], str] = OrderedDict()
        """(owner, file) -> instance of the owner's prompt that produced it (newest last)."""
        self._prompts: OrderedDict[tuple[str, str | None], None] = OrderedDict()

    def record(self, upstream: str, refs: Iterable[FileRef], owner: str | None = None) -> None:
        """``refs`` are on ``upstream`` (outputs of a prompt of ``owner`` when known)."""
        for ref in refs:
            key = _normal(ref)
            if key is None or key[0] == "input":
                continue
            self._where[key] = upstream
            self._where.move_to_end(key)
            if owner:
                self._owned[(owner, key)] = upstream
                self._owned.move_to_end((owner, key))
        while len(self._where) > self._max:
            self._where.popitem(last=False)
        while len(self._owned) > self._max:
            self._owned.popitem(last=False)

    def get(self, ref: FileRef, owner: str | None = None) -> str | None:
        """Where ``ref`` is: the instance of ``owner``'s own prompt that produced it if one
        did, else the last one learnt."""
        if owner and (mine := self._owned.get((owner, ref))) is not None:
            return mine
        return self._where.get(ref)

    def record_history(self, upstream: str, history: object, owner: str | None = None) -> None:
        """The outputs of every finished entry of a history answer (each prompt once, and once
        more when its owner is learnt later)."""
        if not isinstance(history, dict):
            return
        seen = self._prompts
        for prompt_id, entry in history.items():
            if (prompt_id, owner) in seen or not isinstance(entry, dict):
                continue  # finished entries do not change: each is read once
            self.record(upstream, views.output_files(entry.get("outputs")), owner)
            seen[(prompt_id, owner)] = None
            if len(seen) > RECORDED_PROMPTS:
                seen.popitem(last=False)

    def record_outputs(self, upstream: str, outputs: object, owner: str | None = None) -> None:
        self.record(upstream, views.output_files(outputs), owner)


def _normal(ref: FileRef) -> FileRef | None:
    kind, subfolder, name = ref
    try:
        return (kind, clean_relative(subfolder), posixpath.basename(name))
    except PathRefused:
        return None


# -- shared helpers ------------------------------------------------------------------------


def reachable_target(request: web.Request, name: str) -> Upstream | None:
    """The instance called ``name`` if it is reachable now."""
    return next((u for u in request.app[POOL].reachable() if u.name == name), None)


async def prompt_record(request: web.Request, prompt_id: str) -> PromptRecord | None:
    return await request.app[OWNERSHIP].prompt(prompt_id)


async def answer(
    request: web.Request, gathered: Gathered | None, status: int, body: bytes
) -> web.Response:
    """A locally assembled answer, through the isolation rewrite like a forwarded one."""
    ctx = request[CONTEXT]
    body = await ctx.filter_response(status, body)
    return json_response(request, gathered or Gathered([], [], 0.0), status, body)


def _chain(ctx: RequestContext, first: Rewrite) -> None:
    """Run ``first`` before the rewrites the guards set (if any)."""
    ctx.response_filters.insert(0, first)


def _loads(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _unreachable(request: web.Request, record: PromptRecord) -> Gathered:
    """A Gathered naming the prompt's instance as missing (for the degraded header)."""
    missing = request.app[POOL].get(record.upstream)
    return Gathered([], [missing] if missing is not None else [], 0.0)


# -- GET /history/{id} ---------------------------------------------------------------------


async def history_entry(
    request: web.Request, state: MultiInstance, prompt_id: str
) -> web.StreamResponse:
    ctx = request[CONTEXT]
    record = await prompt_record(request, prompt_id)
    lost = await state.lost.verdict(prompt_id)  # the verdict every replica answers
    lost_body = orjson.dumps({prompt_id: lost.history_entry()}) if lost is not None else b"{}"
    if record is not None:
        target = reachable_target(request, record.upstream)
        if target is None:
            return await answer(request, _unreachable(request, record), 200, lost_body)
        owner = record.owner

        async def learn(status: int, body: bytes) -> bytes:
            if status != 200:
                return body
            found = _loads(body)
            if not found and lost is not None:
                return lost_body  # the instance came back without it: it was lost
            state.locations.record_history(target.name, found, owner)
            return body

        _chain(ctx, learn)
        ctx.target = target
        return await forward_http(request)
    # Not submitted through this proxy (or forgotten): whoever has it.
    gathered = await ask_all(request, request.app[POOL].reachable(), "GET", ctx.upstream_path)
    for reply in gathered.answers:
        found = reply.json() if reply.status == 200 else None
        if isinstance(found, dict) and found:
            state.locations.record_history(reply.upstream.name, found)
            return await answer(request, gathered, 200, reply.body)
    return await answer(request, gathered, 200, lost_body)


# -- /api/jobs/{id}[/...] --------------------------------------------------------------------


async def job(
    request: web.Request, state: MultiInstance, job_id: str, rest: list[str]
) -> web.StreamResponse:
    ctx = request[CONTEXT]
    record = await prompt_record(request, job_id)
    detail = not rest and request.method in ("GET", "HEAD")  # HEAD: the GET's answer
    cancel = rest == ["cancel"] and request.method == "POST"
    lost = await state.lost.verdict(job_id)  # the verdict every replica answers
    if record is not None:
        target = reachable_target(request, record.upstream)
        if target is None:
            degraded = _unreachable(request, record)
            if detail and lost is not None:
                return await answer(request, degraded, 200, orjson.dumps(lost.job(detail=True)))
            if cancel:
                return await answer(request, degraded, 200, b'{"cancelled": false}')
            return await answer(request, degraded, 404, JOB_NOT_FOUND)
        if detail and lost is not None:
            # The instance came back: its own answer if it has the job, else the failed job
            # (200, as ComfyUI answers any job it knows; a forwarded 404 keeps its status).
            gathered = await ask_all(request, [target], "GET", ctx.upstream_path)
            for reply in gathered.answers:
                if reply.status == 200:
                    state.locations.record_outputs(
                        target.name, _outputs(reply.json()), record.owner
                    )
                    return await answer(request, gathered, 200, reply.body)
            return await answer(request, gathered, 200, orjson.dumps(lost.job(detail=True)))
        if detail:
            owner = record.owner

            async def learn(status: int, body: bytes) -> bytes:
                if status == 200:
                    state.locations.record_outputs(target.name, _outputs(_loads(body)), owner)
                return body

            _chain(ctx, learn)
        ctx.target = target
        return await forward_http(request)
    if detail:
        gathered = await ask_all(request, request.app[POOL].reachable(), "GET", ctx.upstream_path)
        for reply in gathered.answers:
            if reply.status == 200:
                found = reply.json()
                if isinstance(found, dict):
                    state.locations.record_outputs(reply.upstream.name, found.get("outputs"))
                return await answer(request, gathered, 200, reply.body)
        if lost is not None:
            return await answer(request, gathered, 200, orjson.dumps(lost.job(detail=True)))
        return await answer(request, gathered, 404, JOB_NOT_FOUND)
    if cancel:
        gathered = await ask_all(request, request.app[POOL].reachable(), "POST", ctx.upstream_path)
        cancelled = any(_cancelled(r) for r in gathered.answers)
        return await answer(request, gathered, 200, orjson.dumps({"cancelled": cancelled}))
    return await forward_http(request)  # other sub-routes of an unknown job: home


def _outputs(found: object) -> object:
    return found.get("outputs") if isinstance(found, dict) else None


def _cancelled(reply: Answer) -> bool:
    found = reply.json() if reply.status == 200 else None
    return isinstance(found, dict) and found.get("cancelled") is True


# -- POST /interrupt -------------------------------------------------------------------------


async def interrupt(request: web.Request, state: MultiInstance) -> web.StreamResponse:
    ctx = request[CONTEXT]
    body = await read_json_body(request, ctx)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    if isinstance(prompt_id, str) and prompt_id:
        record = await prompt_record(request, prompt_id)
        if record is not None:
            target = reachable_target(request, record.upstream)
            if target is None:
                return _empty(request, _unreachable(request, record))  # nothing runs it now
            ctx.target = target
            return await forward_http(request)
    # No id (stop whatever runs, as ComfyUI does) or an id the proxy does not know: every
    # instance; each one only stops a prompt it runs.
    gathered = await ask_all(
        request, request.app[POOL].reachable(), "POST", ctx.upstream_path, ctx.body or b""
    )
    return _empty(request, gathered)


def _empty(request: web.Request, gathered: Gathered) -> web.Response:
    """ComfyUI's answer to an action: 200 with no body; the first failure when every instance
    asked failed; 502 when none answered."""
    failures = [a for a in gathered.answers if a.status != 200]
    if not gathered.answers and gathered.missing:
        body = orjson.dumps(
            {
                "error": {
                    "type": "upstream_unavailable",
                    "message": "no ComfyUI instance answered",
                    "details": "",
                    "extra_info": {},
                }
            }
        )
        return json_response(request, gathered, 502, body)
    if failures and len(failures) == len(gathered.answers):
        return json_response(request, gathered, failures[0].status, failures[0].body)
    response = json_response(request, gathered, 200, b"")
    response.content_type = "text/plain"
    return response


# -- POST /queue, POST /history, POST /api/jobs/cancel ------------------------------------


async def _split_ids(
    request: web.Request, ids: list[str], reachable: list[Upstream]
) -> dict[str, list[str]]:
    """Each id under the instance that holds it; ids the proxy does not know go to every
    instance (deleting an id an instance does not have is a no-op there); ids of an
    unreachable instance go nowhere (that instance has them, or lost them)."""
    per: dict[str, list[str]] = {u.name: [] for u in reachable}
    for prompt_id in ids:
        record = await prompt_record(request, prompt_id)
        if record is None:
            for names in per.values():
                names.append(prompt_id)
        elif record.upstream in per:
            per[record.upstream].append(prompt_id)
    return per


async def split_delete(
    request: web.Request, state: MultiInstance, *, history: bool
) -> web.StreamResponse:
    """``POST /queue`` or ``POST /history`` (``delete`` and/or ``clear``)."""
    ctx = request[CONTEXT]
    body = await read_json_body(request, ctx)
    if not isinstance(body, dict):
        return await forward_http(request)  # not reached: refused by the body guard
    raw_ids = body.get("delete")
    ids = [i for i in raw_ids if isinstance(i, str)] if isinstance(raw_ids, list) else []
    clear = bool(body.get("clear"))
    if history:
        await state.lost.forget(ids)
        if clear:
            await state.lost.forget_all()
    reachable = request.app[POOL].reachable()
    per = await _split_ids(request, ids, reachable)
    targets = [u for u in reachable if per[u.name] or clear]
    if not targets:
        return _empty(request, Gathered([], [], 0.0))
    bodies: dict[str, bytes] = {}
    for upstream in targets:
        part: dict[str, Any] = {"clear": True} if clear else {}
        if per[upstream.name]:
            part["delete"] = per[upstream.name]
        bodies[upstream.name] = orjson.dumps(part)
    gathered = await ask_all(request, targets, "POST", ctx.upstream_path, bodies)
    return _empty(request, gathered)


async def jobs_cancel_many(request: web.Request, state: MultiInstance) -> web.StreamResponse:
    """``POST /api/jobs/cancel {"job_ids": [...]}``: each id to its instance."""
    ctx = request[CONTEXT]
    body = await read_json_body(request, ctx)
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(ids, list):
        return await forward_http(request)  # ComfyUI answers 400 itself
    if not all(views.is_canonical_uuid(i) for i in ids):
        return await forward_http(request)  # ComfyUI's own 400 invalid_ids, from home
    reachable = request.app[POOL].reachable()
    per = await _split_ids(request, [str(i) for i in ids], reachable)
    targets = [u for u in reachable if per[u.name]]
    bodies = {u.name: orjson.dumps({**body, "job_ids": per[u.name]}) for u in targets}
    gathered = await ask_all(request, targets, "POST", ctx.upstream_path, bodies)
    refused = [a for a in gathered.answers if 400 <= a.status < 500]
    if refused:
        return await answer(request, gathered, refused[0].status, refused[0].body)
    cancelled = any(_cancelled(r) for r in gathered.answers)
    return await answer(request, gathered, 200, orjson.dumps({"cancelled": cancelled}))


# -- GET /view --------------------------------------------------------------------------------


async def view(request: web.Request, state: MultiInstance) -> web.StreamResponse:
    """An output or temp file from the instance that has it; input files from home."""
    ctx = request[CONTEXT]
    query = request.query
    filename = query.get("filename")
    if ctx.path != "/view" or filename is None:
        return await forward_http(request)
    try:
        ref = view_target(filename, query.get("type"), query.get("subfolder")).ref
    except PathRefused:
        return await forward_http(request)  # ComfyUI's own 400/403, from home
    if ref[0] == "input":
        return await forward_http(request)  # uploads and shared inputs are on every instance
    # The caller's own prompt's copy first: another prompt may have made a file of that name
    # on another instance.
    principal = ctx.principal
    known = state.locations.get(ref, principal.comfy_user if principal is not None else None)
    target = reachable_target(request, known) if known is not None else None
    if target is None:
        probe = views.without_query_params(ctx.upstream_path, PROBE_DROPPED_PARAMS)
        reachable = request.app[POOL].reachable()
        gathered = await ask_all(request, reachable, "HEAD", probe)
        target = next((a.upstream for a in gathered.answers if a.status == 200), None)
        if target is not None:
            state.locations.record(target.name, [ref])
    ctx.target = target
    return await forward_http(request)


__all__ = [
    "FileLocations",
    "history_entry",
    "interrupt",
    "job",
    "jobs_cancel_many",
    "split_delete",
    "view",
]
