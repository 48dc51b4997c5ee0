"""A job's state, read from the ComfyUI instance that accepted it: its queue, then its history.

The order matters: ComfyUI writes a finished prompt's history entry *before* it takes the
prompt off the queue, so a prompt listed in neither (read in this order) was deleted from the
queue or lost with a restarted ComfyUI: ``cancelled``. An instance that cannot be read gives
``unknown`` (never a made-up end). Only the caller's own jobs get here (``proxy.jobs.api``
checks the owner first); these reads are the proxy's own bookkeeping, like the generation
watch, and spend nothing of the caller's rate limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlencode

import aiohttp
import orjson
import structlog
from aiohttp import hdrs

from proxy.errors import UpstreamError
from proxy.upstream.encoding import BACKGROUND_LIMIT, IDENTITY, read_client_answer
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.jobs")

Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "unknown"]
TERMINAL: Final[frozenset[str]] = frozenset({"succeeded", "failed", "cancelled"})
READ_TIMEOUT_SECONDS: Final = 10.0
_OUTPUT_KINDS: Final = ("images", "gifs", "videos", "audio", "3d", "files")


@dataclass(slots=True)
class JobState:
    status: Status
    queue_position: int | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None


async def _get_json(pool: UpstreamPool, upstream: Upstream, path: str) -> Any:
    """ComfyUI's JSON answer, or None when it cannot be read."""
    try:
        async with pool.session.get(
            upstream.url_for(path),
            headers={
                hdrs.HOST: upstream.host_header,
                hdrs.ACCEPT: "application/json",
                hdrs.ACCEPT_ENCODING: IDENTITY,
            },
            timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_SECONDS),
        ) as resp:
            if resp.status != 200:
                return None
            raw = await read_client_answer(
                resp, limit=BACKGROUND_LIMIT, upstream=upstream.name, metrics=pool.metrics
            )
        return orjson.loads(raw)
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError, UpstreamError):
        path_only = path.split("?", maxsplit=1)[0]
        log.warning("job_state_unreadable", upstream=upstream.name, path=path_only)
        return None


def _queue_position(queue: Any, prompt_id: str) -> tuple[Status, int | None] | None:
    if not isinstance(queue, dict):
        return None
    running = queue.get("queue_running")
    pending = queue.get("queue_pending")
    if not isinstance(running, list) or not isinstance(pending, list):
        return None
    for item in running:
        if isinstance(item, list) and len(item) > 1 and item[1] == prompt_id:
            return "running", None
    ordered = sorted(
        (i for i in pending if isinstance(i, list) and len(i) > 1),
        key=lambda i: i[0] if isinstance(i[0], (int, float)) else 0,
    )
    for position, item in enumerate(ordered):
        if item[1] == prompt_id:
            return "queued", position
    return "cancelled", None


def _ms(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) / 1000


def view_url(base_path: str, item: dict[str, Any]) -> str:
    query = {
        "filename": str(item.get("filename", "")),
        "subfolder": str(item.get("subfolder", "")),
        "type": str(item.get("type", "output")),
    }
    return f"{base_path}/api/view?{urlencode(query)}"


def outputs_of(entry: dict[str, Any], base_path: str) -> list[dict[str, Any]]:
    """Every file a history entry lists, with the ``/view`` URL that fetches it."""
    found: list[dict[str, Any]] = []
    outputs = entry.get("outputs")
    if not isinstance(outputs, dict):
        return found
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for kind in _OUTPUT_KINDS:
            items = ui.get(kind)
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    found.append(
                        {
                            "node": str(node_id),
                            "kind": kind,
                            "filename": item["filename"],
                            "subfolder": str(item.get("subfolder", "")),
                            "type": str(item.get("type", "output")),
                            "url": view_url(base_path, item),
                        }
                    )
    return found


def state_from_history(entry: dict[str, Any], base_path: str) -> JobState:
    status_info = entry.get("status")
    messages = status_info.get("messages") if isinstance(status_info, dict) else None
    state = JobState("succeeded", outputs=outputs_of(entry, base_path))
    str_status = status_info.get("status_str") if isinstance(status_info, dict) else None
    if str_status == "error":
        state.status = "failed"
    for message in messages if isinstance(messages, list) else ():
        if not (isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict)):
            continue
        kind, data = message
        at = _ms(data.get("timestamp"))
        if kind == "execution_start":
            state.started_at = at
        elif kind == "execution_success":
            state.finished_at = at
        elif kind == "execution_error":
            state.status = "failed"
            state.finished_at = at
            state.error = {
                "node_id": data.get("node_id"),
                "node_type": data.get("node_type"),
                "exception_type": data.get("exception_type"),
                "message": data.get("exception_message"),
            }
        elif kind == "execution_interrupted":
            state.status = "cancelled"
            state.finished_at = at
            state.error = {
                "node_id": data.get("node_id"),
                "node_type": data.get("node_type"),
                "exception_type": "interrupted",
                "message": "the job was cancelled while it ran",
            }
    return state


async def read_state(
    pool: UpstreamPool, upstream_name: str, prompt_id: str, base_path: str
) -> JobState:
    upstream = pool.get(upstream_name) if upstream_name else pool.home()
    if upstream is None:
        return JobState("unknown")
    queue = await _get_json(pool, upstream, "/queue")
    listed = _queue_position(queue, prompt_id)
    if listed is None:
        return JobState("unknown")
    if listed[0] != "cancelled":
        return JobState(listed[0], queue_position=listed[1])
    history = await _get_json(pool, upstream, f"/history/{prompt_id}")
    if not isinstance(history, dict):
        return JobState("unknown")
    entry = history.get(prompt_id)
    if not isinstance(entry, dict):
        return JobState("cancelled")
    return state_from_history(entry, base_path)


__all__ = ["TERMINAL", "JobState", "Status", "read_state", "state_from_history", "view_url"]
