"""``GET /comfygate/v1/jobs/{id}/events``: a job's progress as Server-Sent Events.

Events, in this order, each with an ``id`` that is its place in the sequence (so the sequence
is the same on every replica and every reconnection)::

    queued (0) -> started (1) -> output (2..) -> done | failed | cancelled (last)

A client that reconnects with ``Last-Event-ID: N`` gets the events after ``N`` only. The
state is read from ComfyUI (``proxy.jobs.status``) every ``jobs.poll_seconds``; a comment
line keeps idle connections open.

While the job runs, *live* events come in between, from the jobs API's own sockets to
ComfyUI (:mod:`proxy.jobs.live`): ``executing`` (the node now running), ``progress``
(``{node, value, max}``) and ``preview`` (the latest preview image: a URL the owner can fetch,
``GET /jobs/{id}/preview``, or with ``?previews=base64`` the image itself). They carry no
``id`` (the last sequence id stays the one to resume from) and are not replayed: a
reconnecting client gets the current ones again, not the history.

Any job of the caller's works, also one submitted with plain ``POST /prompt`` (isolation's
record says whose it is; such a job has the sequence only: its live events go to the
client's own socket); another user's is a 404.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.errors import BadRequest, NotFound
from proxy.jobs.api import JOBS, current_state, find_job
from proxy.jobs.live_store import LiveJobs
from proxy.jobs.status import TERMINAL, JobState
from proxy.jobs.view import API_PREFIX
from proxy.settings import SETTINGS

KEEPALIVE_SECONDS: Final = 15.0
_ENDS: Final = {"succeeded": "done", "failed": "failed", "cancelled": "cancelled"}


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id", ""))
    try:
        return int(raw) if raw else -1
    except ValueError:
        return -1


def sequence(job_id: str, state: JobState) -> list[tuple[str, dict[str, Any]]]:
    """Every event the job's state implies so far, in order (ids are list positions)."""
    events: list[tuple[str, dict[str, Any]]] = [
        ("queued", {"job": job_id, "queue_position": state.queue_position})
    ]
    if state.status == "queued":
        return events
    if state.status in ("running", *TERMINAL) and state.status != "unknown":
        events.append(("started", {"job": job_id, "at": state.started_at}))
    if state.status in TERMINAL:
        for output in state.outputs:
            events.append(("output", {"job": job_id, **output}))
        events.append(
            (
                _ENDS[state.status],
                {
                    "job": job_id,
                    "status": state.status,
                    "error": state.error,
                    "outputs": state.outputs,
                },
            )
        )
    return events


async def live_events(
    live: LiveJobs,
    job_id: str,
    seen: dict[str, Any],
    *,
    preview_url: str,
    inline: bool,
) -> list[tuple[str, dict[str, Any]]]:
    """The live events of ``job_id`` that changed since ``seen`` (updated in place)."""
    now = await live.get(job_id)
    if now is None:
        return []
    events: list[tuple[str, dict[str, Any]]] = []
    node = now.get("node")
    if node is not None and node != seen.get("node"):
        events.append(("executing", {"job": job_id, "node": node}))
    progress = now.get("progress")
    if isinstance(progress, dict) and progress != seen.get("progress"):
        events.append(("progress", {"job": job_id, **progress}))
    number = now.get("preview", 0)
    if isinstance(number, int) and number > int(seen.get("preview", 0)):
        preview: dict[str, Any] = {"job": job_id, "url": f"{preview_url}?n={number}"}
        if inline:
            found = await live.preview(job_id)
            if found is not None:
                preview["mime"] = found[0]
                preview["base64"] = base64.b64encode(found[1]).decode()
        events.append(("preview", preview))
    seen.update(now)
    return events


async def job_events(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["id"]
    previews = request.query.get("previews", "url")
    if previews not in ("url", "base64"):
        raise BadRequest("previews must be url or base64", error_type="invalid_previews")
    record, upstream = await find_job(request, job_id)  # another user's job: 404, nothing sent
    base = request.app[SETTINGS].server.base_path
    preview_url = f"{base}{API_PREFIX}/jobs/{job_id}/preview"
    seen: dict[str, Any] = {}
    jobs = request.app[JOBS]
    sent = _last_event_id(request)
    jobs.metrics.events_streams.labels("resumed" if sent >= 0 else "new").inc()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a buffering reverse proxy in front would hold events
        }
    )
    await response.prepare(request)
    poll = jobs.settings.poll_seconds
    quiet_since = time.monotonic()
    while True:
        state = await current_state(request, job_id, record, upstream)
        events = sequence(job_id, state)
        for number, (name, data) in enumerate(events):
            if number <= sent:
                continue
            payload = orjson.dumps(data).decode()
            await response.write(f"id: {number}\nevent: {name}\ndata: {payload}\n\n".encode())
            sent = number
            quiet_since = time.monotonic()
        if state.status in TERMINAL:
            break
        if state.status == "running":
            for name, data in await live_events(
                jobs.live, job_id, seen, preview_url=preview_url, inline=previews == "base64"
            ):
                payload = orjson.dumps(data).decode()
                await response.write(f"event: {name}\ndata: {payload}\n\n".encode())
                quiet_since = time.monotonic()
        if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            await response.write(b": keepalive\n\n")
            quiet_since = time.monotonic()
        await asyncio.sleep(poll)
    await response.write_eof()
    return response


async def job_preview(request: web.Request) -> web.Response:
    """``GET /jobs/{id}/preview``: the job's latest live preview (the owner's only)."""
    job_id = request.match_info["id"]
    await find_job(request, job_id)  # another user's job: 404
    found = await request.app[JOBS].live.preview(job_id)
    if found is None:
        raise NotFound("no preview of this job (yet)", error_type="preview_not_found")
    mime, image = found
    return web.Response(
        body=image,
        content_type=mime if mime.startswith("image/") else "application/octet-stream",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


__all__ = ["job_events", "job_preview", "live_events", "sequence"]
