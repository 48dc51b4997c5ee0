"""The jobs API's collectors, registered on the app's registry (``app[METRICS].registry``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.submitted = Counter(
            "comfygate_jobs_submitted",
            "Jobs submitted through the jobs API, by kind (template/workflow) and outcome "
            "(accepted, refused: a guard or ComfyUI said no, cached: a result-cache hit).",
            ("kind", "outcome"),
            registry=registry,
        )
        self.finished = Counter(
            "comfygate_jobs_finished",
            "Jobs seen ending by a waiting request, an event stream or a status read, "
            "by state (succeeded, failed, cancelled); each job counted once per process.",
            ("state",),
            registry=registry,
        )
        self.cancels = Counter(
            "comfygate_jobs_cancel_requests",
            "DELETE /jobs/{id}, by outcome.",
            ("outcome",),
            registry=registry,
        )
        self.cache = Counter(
            "comfygate_jobs_cache",
            "Result-cache lookups of templates with a cache, by outcome (hit, miss).",
            ("outcome",),
            registry=registry,
        )
        self.events_streams = Counter(
            "comfygate_jobs_event_streams",
            "GET /jobs/{id}/events streams opened (resumed: with Last-Event-ID).",
            ("kind",),
            registry=registry,
        )
