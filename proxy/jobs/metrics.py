"""The jobs API's collectors, registered on the app's registry (``app[METRICS].registry``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.webhook_attempts = Counter(
            "comfygate_jobs_webhook_attempts",
            "Webhook delivery attempts, by outcome (delivered: a 2xx answer, failed: another "
            "answer or none, retried later; dropped: failed past the retry period; refused: "
            "the destination is no longer allowed).",
            ("outcome",),
            registry=registry,
        )
        self.webhook_seconds = Histogram(
            "comfygate_jobs_webhook_attempt_seconds",
            "Duration of webhook attempts (resolution, connection, answer).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.webhook_outbox = Gauge(
            "comfygate_jobs_webhook_outbox",
            "Webhook messages waiting in the outbox (shared by replicas with Redis), as last "
            "seen by this process.",
            registry=registry,
        )
        self.webhook_refused = Counter(
            "comfygate_jobs_webhook_refused",
            "Webhook URLs refused at submit (allowlist, address, scheme).",
            registry=registry,
        )
        self.live_events = Counter(
            "comfygate_jobs_live_events",
            "ComfyUI events of jobs read by the jobs watcher's sockets, by type.",
            ("type",),
            registry=registry,
        )
        self.watched = Gauge(
            "comfygate_jobs_watched",
            "Unfinished jobs the background watcher follows (shared with Redis).",
            registry=registry,
        )
