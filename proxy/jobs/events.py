"""``GET /comfygate/v1/jobs/{id}/events``: a job's progress as Server-Sent Events.

Events, in this order, each with an ``id`` that is its place in the sequence (so the sequence
is the same on every replica and every reconnection)::

    queued (0) -> started (1) -> output (2..) -> done | failed | cancelled (last)

A client that reconnects with ``Last-Event-ID: N`` gets the events after ``N`` only. The
state is read from ComfyUI (``proxy.jobs.status``) every ``jobs.poll_seconds``; a comment
line keeps idle connections open. Any job of the caller's works, also one submitted with plain
``POST /prompt`` (isolation's record says whose it is); another user's is a 404.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.jobs.api import JOBS, current_state, find_job
from proxy.jobs.status import TERMINAL, JobState

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


async def job_events(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["id"]
    record, upstream = await find_job(request, job_id)  # another user's job: 404, nothing sent
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
        if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            await response.write(b": keepalive\n\n")
            quiet_since = time.monotonic()
        await asyncio.sleep(poll)
    await response.write_eof()
    return response


__all__ = ["job_events", "sequence"]
