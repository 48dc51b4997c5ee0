"""``/api/jobs`` helpers, a condensed port of newer ComfyUI's ``comfy_execution/jobs.py``.

Not in 0.3.64 (the captures' server); the shapes follow docs/comfyui-protocol.md#jobs-api: list
items with ``id, status, priority, create_time, execution_start_time, execution_end_time,
execution_error, outputs_count, previewable_outputs_count, preview_output, workflow_id`` (None
pruned), details adding ``outputs``, ``execution_status`` and ``workflow``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "in_progress",
    "completed",
    "failed",
    "cancelled",
)
ALL_STATUSES = [PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED]
PREVIEWABLE = frozenset({"images", "video", "audio", "3d", "text"})


def validate_job_id(value: Any) -> str:
    """Canonical lowercase hyphenated UUID, else ValueError (newer ``prompt_id`` rule too)."""
    if not isinstance(value, str):
        raise ValueError(f"job id must be a string, got {type(value).__name__}")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError as exc:
        raise ValueError("job id must be a UUID in canonical lowercase hyphenated form") from exc
    if canonical != value:
        raise ValueError("job id must be a UUID in canonical lowercase hyphenated form")
    return value


def parse_list_params(query: Mapping[str, str]) -> dict[str, Any]:
    """Query parameters of ``GET /api/jobs``; ValueError -> 400 ``{"error": ...}``."""
    status_filter = None
    if query.get("status"):
        status_filter = [s.strip() for s in query["status"].split(",") if s.strip()]
        bad = [s for s in status_filter if s not in ALL_STATUSES]
        if bad:
            raise ValueError(f"Invalid status filter: {', '.join(bad)}")
    sort_by = query.get("sort_by", "created_at")
    if sort_by not in ("created_at", "execution_duration"):
        raise ValueError("sort_by must be 'created_at' or 'execution_duration'")
    sort_order = query.get("sort_order", "desc")
    if sort_order not in ("asc", "desc"):
        raise ValueError("sort_order must be 'asc' or 'desc'")
    limit: int | None = None
    if "limit" in query:
        try:
            limit = int(query["limit"])
        except ValueError as exc:
            raise ValueError("limit must be an integer") from exc
        if limit <= 0:
            raise ValueError("limit must be a positive integer")
    try:
        offset = int(query.get("offset", "0"))
    except ValueError as exc:
        raise ValueError("offset must be an integer") from exc
    if offset < 0:
        raise ValueError("offset must be non-negative")
    return {
        "status_filter": status_filter,
        "workflow_id": query.get("workflow_id") or None,
        "sort_by": sort_by,
        "sort_order": sort_order,
        "limit": limit,
        "offset": offset,
    }


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _metadata(extra_data: dict[str, Any]) -> tuple[Any, Any]:
    pnginfo = extra_data.get("extra_pnginfo") or {}
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    workflow_id = workflow.get("id") if isinstance(workflow, dict) else None
    return extra_data.get("create_time"), workflow_id


def queue_job(item: Any, status: str, *, detail: bool = False) -> dict[str, Any]:
    priority, prompt_id, prompt, extra_data, _ = item
    create_time, workflow_id = _metadata(extra_data)
    job = _prune(
        {
            "id": prompt_id,
            "status": status,
            "priority": priority,
            "create_time": create_time,
            "outputs_count": 0,
            "previewable_outputs_count": 0,
            "workflow_id": workflow_id,
        }
    )
    if detail:
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _outputs_summary(outputs: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    count = previewable = 0
    preview: dict[str, Any] | None = None
    fallback: dict[str, Any] | None = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if media_type not in PREVIEWABLE:
                    continue
                previewable += 1
                enriched = {**item, "nodeId": node_id, "mediaType": media_type}
                if preview is None and item.get("type") == "output":
                    preview = enriched
                elif fallback is None:
                    fallback = enriched
    return count, previewable, preview or fallback


def history_job(prompt_id: str, entry: dict[str, Any], *, detail: bool = False) -> dict[str, Any]:
    priority, _, prompt, extra_data, _ = entry["prompt"]
    create_time, workflow_id = _metadata(extra_data)
    status_info = entry.get("status") or {}
    start = end = error = None
    interrupted = False
    for event, data in status_info.get("messages", []):
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if event == "execution_error" else error
            interrupted = interrupted or event == "execution_interrupted"
    if status_info.get("status_str") == "error":
        status = CANCELLED if interrupted else FAILED
    else:
        status = COMPLETED
    outputs = entry.get("outputs", {})
    count, previewable, preview = _outputs_summary(outputs)
    job = _prune(
        {
            "id": prompt_id,
            "status": status,
            "priority": priority,
            "create_time": create_time,
            "execution_start_time": start,
            "execution_end_time": end,
            "execution_error": error,
            "outputs_count": count,
            "previewable_outputs_count": previewable,
            "preview_output": preview,
            "workflow_id": workflow_id,
        }
    )
    if detail:
        job["outputs"] = outputs
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def get_job(
    prompt_id: str, running: list[Any], pending: list[Any], history: dict[str, Any]
) -> dict[str, Any] | None:
    if prompt_id in history:
        return history_job(prompt_id, history[prompt_id], detail=True)
    for item in running:
        if item[1] == prompt_id:
            return queue_job(item, IN_PROGRESS, detail=True)
    for item in pending:
        if item[1] == prompt_id:
            return queue_job(item, PENDING, detail=True)
    return None


def get_all_jobs(
    running: list[Any],
    pending: list[Any],
    history: dict[str, Any],
    *,
    status_filter: list[str] | None,
    workflow_id: str | None,
    sort_by: str,
    sort_order: str,
    limit: int | None,
    offset: int,
) -> tuple[list[dict[str, Any]], int]:
    wanted = status_filter or ALL_STATUSES
    found: list[dict[str, Any]] = []
    if IN_PROGRESS in wanted:
        found += [queue_job(item, IN_PROGRESS) for item in running]
    if PENDING in wanted:
        found += [queue_job(item, PENDING) for item in pending]
    if {COMPLETED, FAILED, CANCELLED} & set(wanted):
        for prompt_id, entry in history.items():
            job = history_job(prompt_id, entry)
            if job["status"] in wanted:
                found.append(job)
    if workflow_id:
        found = [j for j in found if j.get("workflow_id") == workflow_id]

    def key(job: dict[str, Any]) -> Any:
        if sort_by == "execution_duration":
            s, e = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
            return e - s if s and e else 0
        return job.get("create_time", 0)

    found.sort(key=key, reverse=sort_order == "desc")
    total = len(found)
    found = found[offset:] if offset > 0 else found
    if limit is not None:
        found = found[:limit]
    return found, total
