"""Prometheus collectors, on a registry owned by the app (a fresh one per app in tests).

Labels stay bounded: route *rule names*, methods, status codes, upstream names from config;
never raw paths or user ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from proxy import __version__

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every collector comfygate exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("comfygate_build", "Build information.", registry=r).info({"version": __version__})
        self.requests = Counter(
            "comfygate_http_requests",
            "HTTP requests handled, by route rule, method and status.",
            ("rule", "method", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "comfygate_http_request_duration_seconds",
            "Time from request start to response end, by route rule.",
            ("rule",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "comfygate_upstream_duration_seconds",
            "Time spent waiting on the upstream per request, by upstream.",
            ("upstream",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "comfygate_upstream_errors",
            "Requests that failed toward the upstream, by upstream and kind.",
            ("upstream", "kind"),
            registry=r,
        )
        self.rejections = Counter(
            "comfygate_rejections",
            "Requests refused by the proxy itself, by error type.",
            ("type",),
            registry=r,
        )
        self.ws_open = Gauge(
            "comfygate_websocket_connections",
            "Relayed WebSocket connections currently open.",
            registry=r,
        )
        self.ws_frames = Counter(
            "comfygate_websocket_frames",
            "WebSocket frames relayed, by direction and kind.",
            ("direction", "kind"),
            registry=r,
        )
        self.ws_bytes = Counter(
            "comfygate_websocket_bytes",
            "WebSocket payload bytes relayed, by direction.",
            ("direction",),
            registry=r,
        )
        self.ws_previews_dropped = Counter(
            "comfygate_websocket_previews_dropped",
            "Stale binary previews dropped because a client could not keep up.",
            registry=r,
        )
        self.ws_slow_clients = Counter(
            "comfygate_websocket_slow_clients_closed",
            "Clients closed with 1013 because their event queue overflowed.",
            registry=r,
        )
        # -- limits (rate limits, queue quotas) and their Redis ------------------------------
        self.ratelimit_decisions = Counter(
            "comfygate_ratelimit_decisions",
            "Rate-limit checks, by route class and outcome "
            "(allowed, limited, failed_open, failed_closed, unlimited).",
            ("route_class", "outcome"),
            registry=r,
        )
        self.quota_refusals = Counter(
            "comfygate_queue_quota_refusals",
            "Submissions refused for queue quotas, by reason (user_quota, upstream_cap).",
            ("reason",),
            registry=r,
        )
        self.queue_quota_in_use = Gauge(
            "comfygate_queue_quota_tracked_prompts",
            "Unfinished prompts the proxy counts against quotas, by upstream (this process's "
            "last reconciliation).",
            ("upstream",),
            registry=r,
        )
        self.redis_duration = Histogram(
            "comfygate_redis_command_duration_seconds",
            "Redis round trips made on the request path, by operation.",
            ("op",),
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1),
            registry=r,
        )
        self.redis_errors = Counter(
            "comfygate_redis_errors",
            "Redis operations that failed, by operation and kind (timeout, connection, error, "
            "breaker_open).",
            ("op", "kind"),
            registry=r,
        )
        self.redis_breaker_state = Gauge(
            "comfygate_redis_breaker_state",
            "Circuit breaker in front of Redis: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        # -- workflow policy ----------------------------------------------------------------
        self.policy_refusals = Counter(
            "comfygate_policy_refusals",
            "Workflow violations refused by the policy, by violation type.",
            ("reason",),
            registry=r,
        )
