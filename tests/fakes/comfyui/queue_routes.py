"""HTTP side of the queue: ``/prompt``, ``/queue``, ``/interrupt``, ``/history``, ``/free`` and the
newer ``/api/jobs`` family.

Handlers follow ComfyUI 0.3.64 ``server.py`` line by line (status codes and bodies of
http-basic.json, validation-errors.json, interrupt-and-queue.json, history-clear.json):
``request.json()`` errors are not caught (500 text page), ``number``/``front`` priority,
``prompt_id`` taken verbatim (or, with ``strict_prompt_id``, checked like newer servers),
``client_id`` copied into ``extra_data``. ``/api/jobs*`` follow ``comfy_execution/jobs.py``
(newer servers only; registered with the literal ``/api`` prefix, so not mirrored).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import jobs
from .queue import QueueItem
from .validation import validate_prompt

if TYPE_CHECKING:
    from .server import FakeComfyUI


def _same_id(prompt_id: Any) -> Callable[[QueueItem], bool]:
    def match(item: QueueItem) -> bool:
        return bool(item[1] == prompt_id)

    return match


def add_routes(fake: FakeComfyUI, routes: web.RouteTableDef) -> None:
    """Register the mirrored (bare + ``/api``) queue routes on ``routes``."""
    queue = fake.queue

    @routes.get("/prompt")
    async def get_prompt(request: web.Request) -> web.Response:
        return web.json_response(queue.queue_info())

    @routes.post("/prompt")
    async def post_prompt(request: web.Request) -> web.Response:
        fake.log("got prompt")  # as ComfyUI 0.3.64: first, with no id, valid or not
        json_data = await request.json()
        if "number" in json_data:
            number: float | int = float(json_data["number"])
        else:
            number = queue.number
            # ``in``, not ``.get``: ComfyUI tests membership, so a JSON array (no "prompt" in
            # it) gets the 400 no_prompt answer below, not a 500.
            if "front" in json_data and json_data["front"]:  # noqa: RUF019
                number = -number
            queue.number += 1
        if "prompt" not in json_data:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        if fake.strict_prompt_id and json_data.get("prompt_id") is not None:
            try:
                prompt_id = jobs.validate_job_id(json_data["prompt_id"])
            except ValueError as exc:
                error = {
                    "type": "invalid_prompt_id",
                    "message": "Invalid prompt_id",
                    "details": str(exc),
                    "extra_info": {},
                }
                return web.json_response({"error": error, "node_errors": {}}, status=400)
        elif fake.strict_prompt_id:
            prompt_id = str(uuid.uuid4())
        else:
            prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        partial = json_data.get("partial_execution_targets")
        valid = validate_prompt(fake.registry, prompt, partial)
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not valid[0]:
            return web.json_response({"error": valid[1], "node_errors": valid[3]}, status=400)
        if not await fake.submit_hold.at("before_queue", prompt_id):
            raise web.HTTPServiceUnavailable  # fake-only: dropped, as if never received
        await queue.put((number, prompt_id, prompt, extra_data, valid[2]))
        await fake.submit_hold.at("after_queue", prompt_id)
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": valid[3]}
        )

    @routes.get("/queue")
    async def get_queue(request: web.Request) -> web.Response:
        running, pending = queue.current_queue()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    @routes.post("/queue")
    async def post_queue(request: web.Request) -> web.Response:
        json_data = await request.json()
        if json_data.get("clear"):
            await queue.wipe_queue()
        if "delete" in json_data:
            for id_to_delete in json_data["delete"]:
                await queue.delete_queue_item(_same_id(id_to_delete))
        return web.Response(status=200)

    @routes.post("/interrupt")
    async def post_interrupt(request: web.Request) -> web.Response:
        try:
            json_data = await request.json()
        except json.JSONDecodeError:
            json_data = {}
        prompt_id = json_data.get("prompt_id")
        if prompt_id:
            running, _ = queue.current_queue()
            if any(item[1] == prompt_id for item in running):
                queue.interrupt()
        else:
            queue.interrupt()
        return web.Response(status=200)

    @routes.post("/free")
    async def post_free(request: web.Request) -> web.Response:
        json_data = await request.json()
        for key in ("unload_models", "free_memory"):
            if json_data.get(key, False):
                queue.flags[key] = json_data[key]
        return web.Response(status=200)

    @routes.get("/history")
    async def get_history(request: web.Request) -> web.Response:
        max_items = request.rel_url.query.get("max_items", None)
        offset = request.rel_url.query.get("offset", None)
        return web.json_response(
            queue.get_history(
                max_items=int(max_items) if max_items is not None else None,
                offset=int(offset) if offset is not None else -1,
            )
        )

    @routes.get("/history/{prompt_id}")
    async def get_history_item(request: web.Request) -> web.Response:
        return web.json_response(queue.get_history(prompt_id=request.match_info["prompt_id"]))

    @routes.post("/history")
    async def post_history(request: web.Request) -> web.Response:
        json_data = await request.json()
        if json_data.get("clear"):
            queue.wipe_history()
        if "delete" in json_data:
            for id_to_delete in json_data["delete"]:
                queue.delete_history_item(id_to_delete)
        return web.Response(status=200)


def add_jobs_routes(fake: FakeComfyUI, routes: web.RouteTableDef) -> None:
    """``/api/jobs*`` (only with the literal prefix, as in newer ComfyUI)."""
    queue = fake.queue

    @routes.get("/api/jobs")
    async def list_jobs(request: web.Request) -> web.Response:
        query = request.rel_url.query
        try:
            params = jobs.parse_list_params(query)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        running, pending = queue.current_queue()
        items, total = jobs.get_all_jobs(running, pending, queue.history, **params)
        offset, limit = params["offset"], params["limit"]
        has_more = offset + len(items) < total
        return web.json_response(
            {
                "jobs": items,
                "pagination": {
                    "offset": offset,
                    "limit": limit,
                    "total": total,
                    "has_more": has_more,
                },
            }
        )

    @routes.get("/api/jobs/{job_id}")
    async def get_job(request: web.Request) -> web.Response:
        running, pending = queue.current_queue()
        job = jobs.get_job(request.match_info["job_id"], running, pending, queue.history)
        if job is None:
            return web.json_response({"error": "Job not found"}, status=404)
        return web.json_response(job)

    async def cancel(prompt_id: str) -> bool:
        running, pending = queue.current_queue()
        if any(item[1] == prompt_id for item in running):
            queue.interrupt()
            return True
        if any(item[1] == prompt_id for item in pending):
            return await queue.delete_queue_item(lambda a: a[1] == prompt_id)
        return False

    @routes.post("/api/jobs/{job_id}/cancel")
    async def cancel_one(request: web.Request) -> web.Response:
        return web.json_response({"cancelled": await cancel(request.match_info["job_id"])})

    @routes.post("/api/jobs/cancel")
    async def cancel_many(request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "Invalid JSON body"}, status=400)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list):
            return web.json_response({"error": "job_ids must be a list"}, status=400)
        invalid = []
        for job_id in ids:
            try:
                jobs.validate_job_id(job_id)
            except ValueError:
                invalid.append(job_id)
        if invalid:
            return web.json_response(
                {"error": "job_ids must be canonical UUIDs", "invalid_ids": invalid}, status=400
            )
        cancelled = False
        for job_id in ids:
            cancelled = await cancel(job_id) or cancelled
        return web.json_response({"cancelled": cancelled})
