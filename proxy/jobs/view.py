"""A job as the API shows it (``GET /jobs/{id}``, listings, webhook payloads)."""

from __future__ import annotations

from typing import Any, Final

from proxy.jobs.status import JobState
from proxy.jobs.store import JobRecord

API_PREFIX: Final = "/comfygate/v1"


def job_view(
    base_path: str, job_id: str, record: JobRecord | None, state: JobState
) -> dict[str, Any]:
    base = f"{base_path}{API_PREFIX}/jobs/{job_id}"
    submitted = record.created_at if record is not None else None
    timings: dict[str, Any] = {
        "submitted_at": submitted,
        "started_at": state.started_at,
        "finished_at": state.finished_at,
        "queued_seconds": None,
        "run_seconds": None,
    }
    if submitted is not None and state.started_at is not None:
        timings["queued_seconds"] = round(max(0.0, state.started_at - submitted), 3)
    if state.started_at is not None and state.finished_at is not None:
        timings["run_seconds"] = round(max(0.0, state.finished_at - state.started_at), 3)
    return {
        "id": job_id,
        "status": state.status,
        "template": record.template if record is not None and record.template else None,
        "queue_position": state.queue_position,
        "progress": state.progress,
        "outputs": state.outputs,
        "timings": timings,
        "error": state.error,
        "cache": {
            "hit": bool(record is not None and record.cache_hit_of),
            "source_job": record.cache_hit_of
            if record is not None and record.cache_hit_of
            else None,
        },
        "links": {"self": base, "events": f"{base}/events", "preview": f"{base}/preview"},
    }


__all__ = ["API_PREFIX", "job_view"]
