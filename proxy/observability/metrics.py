"""Prometheus collectors, on a registry owned by the app (a fresh one per app in tests).

Labels stay bounded: route *rule names*, methods, status codes, upstream names from config,
role names from config, fixed enums; never raw paths or user ids (the opt-in per-user counter
of :mod:`proxy.observability.users` aside).

Several worker processes (``comfygate serve --workers N``): the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before any worker imports ``prometheus_client``, so every value
below is kept in that directory's memory-mapped files whatever registry it is attached to, and
the one ``/metrics`` listener reads them all (:mod:`proxy.monitoring.exposition`). Each gauge
therefore says how the workers' values combine (``multiprocess_mode``); ``Info`` does not work
in that mode, so build information is a gauge.

The request path records through :meth:`Metrics.request_finished`, which keeps the labelled
children it has used in plain dicts: ``labels()`` validates and locks on every call, a dict
lookup does not.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Final, Protocol

import orjson
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from proxy import __version__
from proxy.observability.users import UserCounter
from proxy.routes import RouteRule


class Caller(Protocol):
    """Who made a request, as counted (``proxy.principal.Principal``)."""

    @property
    def subject(self) -> str: ...
    @property
    def roles(self) -> frozenset[str]: ...


class RequestLine(Protocol):
    """What of the request itself a finished request counts for (a ``web.Request``, or the
    snapshot a relay that outlives its handler keeps: ``proxy.chain``)."""

    @property
    def method(self) -> str: ...
    @property
    def query(self) -> Mapping[str, str]: ...


class FinishedRequest(Protocol):
    """What a finished request counts for: the fields of ``proxy.state.RequestContext`` read
    here (a protocol, so metrics sit below the request context every layer imports)."""

    @property
    def rule(self) -> RouteRule: ...
    @property
    def path(self) -> str: ...
    @property
    def upstream(self) -> str: ...
    @property
    def upstream_seconds(self) -> float: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def rejected_by(self) -> str: ...
    @property
    def error_type(self) -> str: ...
    @property
    def principal(self) -> Caller | None: ...
    @property
    def body(self) -> bytes | None: ...
    @property
    def parsed_body(self) -> tuple[bytes, object] | None: ...


class GenerationWatcher(Protocol):
    """What the request path and the relays tell generation tracking
    (``proxy.monitoring.generation.GenerationTracker``, installed by the app)."""

    def submitted(self, prompt_id: str | None, roles: frozenset[str], upstream: str) -> None: ...
    def observe_frame(self, frame: str, roles: frozenset[str], upstream: str) -> None: ...
    def prompt_left_queue(self, prompt_id: str, upstream: str) -> None: ...


# ``_created`` series double the exposition and Prometheus' text-format scrape stores them as
# separate gauges nobody queries.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
"""Queue wait and execution time: a cached prompt takes 0.1 s, a video an hour."""
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_WEBSOCKET_UPGRADE: Final = 101
_VIEW_TYPES: Final = frozenset({"output", "temp", "input"})

_AUTH_GUARDS: Final = frozenset({"auth"})
_CSRF_GUARDS: Final = frozenset({"origin", "csrf"})
_LOGIN_FAILURES: Final = {401: "login_failed", 429: "login_throttled"}


def method_label(method: str) -> str:
    """aiohttp accepts any token as a method: unknown ones share one label."""
    return method if method in _METHODS else "other"


def submitted_prompt_id(ctx: FinishedRequest) -> str | None:
    """The id of a prompt ComfyUI accepted, from the body the proxy forwarded (the isolation
    guard, or the quota guard, puts one in; a client-chosen id otherwise). Parsed only for
    accepted submissions, reusing the guards' parse when it is still current."""
    body = ctx.body
    if not body or b'"prompt_id"' not in body:
        return None
    parsed = ctx.parsed_body
    if parsed is not None and parsed[0] is body:
        data = getattr(parsed[1], "body", None)  # proxy.comfy.submission.Submission
    else:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
    return prompt_id if isinstance(prompt_id, str) and prompt_id else None


def role_label(roles: frozenset[str]) -> str:
    """One label for a principal's roles (names from config): sorted, joined with ``+``."""
    if not roles:
        return "none"
    return next(iter(roles)) if len(roles) == 1 else "+".join(sorted(roles))


class Metrics:
    """Every collector comfygate exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "comfygate_build_info",
            "Build information (always 1).",
            ("version", "python"),
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # -- HTTP --------------------------------------------------------------------------
        self.requests = Counter(
            "comfygate_http_requests",
            "HTTP requests handled, by route rule, method and status (101: WebSocket upgrade, "
            "499: client went away).",
            ("rule", "method", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "comfygate_http_request_duration_seconds",
            "Time from request start to response end, by route rule (WebSockets excluded).",
            ("rule",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.proxy_duration = Histogram(
            "comfygate_http_proxy_duration_seconds",
            "Request time not spent waiting on the upstream (the proxy's own work, guards, "
            "Redis, writing to the client), by route rule.",
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
        self.request_bytes = Counter(
            "comfygate_http_request_bytes",
            "Request body bytes received from clients, by route rule (WebSockets excluded).",
            ("rule",),
            registry=r,
        )
        self.response_bytes = Counter(
            "comfygate_http_response_bytes",
            "Response body bytes sent to clients, by route rule (WebSockets excluded).",
            ("rule",),
            registry=r,
        )
        self.rejections = Counter(
            "comfygate_rejections",
            "Requests refused by the proxy itself, by error type.",
            ("type",),
            registry=r,
        )
        # -- upstreams ---------------------------------------------------------------------
        self.upstream_errors = Counter(
            "comfygate_upstream_errors",
            "Requests that failed toward the upstream, by upstream and kind "
            "(timeout, refused, protocol, ws_handshake, bad_encoding: an answer the proxy must "
            "read came in an encoding it cannot read).",
            ("upstream", "kind"),
            registry=r,
        )
        self.upstream_up = Gauge(
            "comfygate_upstream_up",
            "Whether the upstream answered its last probe (1) or not (0).",
            ("upstream",),
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.upstream_probe_duration = Histogram(
            "comfygate_upstream_probe_duration_seconds",
            "Round trip of the upstream probe (GET /prompt), by upstream.",
            ("upstream",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_probe_failures = Counter(
            "comfygate_upstream_probe_failures",
            "Failed upstream probes, by upstream and kind (timeout, refused, status, protocol).",
            ("upstream", "kind"),
            registry=r,
        )
        self.upstream_queue = Gauge(
            "comfygate_upstream_queue_prompts",
            "Prompts in the upstream's queue at its last probe, by state (pending, running).",
            ("upstream", "state"),
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        # -- several instances: registry and placement (proxy/upstream) ---------------------
        self.upstream_state = Gauge(
            "comfygate_upstream_breaker_state",
            "Circuit breaker of each instance: 0 closed (takes prompts), 1 half-open, 2 open.",
            ("upstream",),
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.upstream_drained = Gauge(
            "comfygate_upstream_drained",
            "Whether the instance is drained (1: no new prompts) or not (0).",
            ("upstream",),
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.upstream_events = Counter(
            "comfygate_upstream_events",
            "Registry events: instances joined, left, went down, came up.",
            ("event",),
            registry=r,
        )
        self.placements = Counter(
            "comfygate_placements",
            "Placement of POST /prompt, by outcome (placed, moved: retried on another instance, "
            "no_capable_instance: 400, no_healthy_instance: 503).",
            ("outcome",),
            registry=r,
        )
        self.placement_duration = Histogram(
            "comfygate_placement_duration_seconds",
            "Time to choose the instance of a prompt (capabilities, load, affinity).",
            buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025),
            registry=r,
        )
        self.file_copies = Counter(
            "comfygate_upstream_file_copies",
            "Files stored on other instances by the proxy, by reason (replicated: an upload "
            "copied to every instance; on_demand: an input a prompt needs) and outcome.",
            ("reason", "outcome"),
            registry=r,
        )
        self.prompts_lost = Counter(
            "comfygate_prompts_lost",
            "Prompts reported failed because the instance holding them became unavailable, "
            "by upstream.",
            ("upstream",),
            registry=r,
        )
        self.home_failovers = Counter(
            "comfygate_home_failovers",
            "Reads of the home instance (system_stats, model lists, object_info, frontend "
            "files) answered by another instance because it was down, by route rule.",
            ("rule",),
            registry=r,
        )
        self.ws_upstream_reconnects = Counter(
            "comfygate_websocket_upstream_reconnects",
            "Fan-in sockets reconnected to an instance after it went away, by upstream.",
            ("upstream",),
            registry=r,
        )
        self.idempotency = Counter(
            "comfygate_idempotency_keys",
            "Submissions with an Idempotency-Key, by outcome (first, replayed, in_progress, "
            "mismatch).",
            ("outcome",),
            registry=r,
        )
        # -- generation --------------------------------------------------------------------
        self.prompts_submitted = Counter(
            "comfygate_prompts_submitted",
            "Prompts accepted by ComfyUI (POST /prompt answered 200), by role.",
            ("role",),
            registry=r,
        )
        self.prompts_finished = Counter(
            "comfygate_prompts_finished",
            "Prompts that ended, by role and outcome (completed, failed, interrupted).",
            ("role", "outcome"),
            registry=r,
        )
        self.prompt_queue_wait = Histogram(
            "comfygate_prompt_queue_wait_seconds",
            "Time from submission through the proxy to the start of execution, by upstream.",
            ("upstream",),
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.prompt_execution = Histogram(
            "comfygate_prompt_execution_seconds",
            "Execution time of a prompt on ComfyUI (start to success, error or interrupt), "
            "by upstream.",
            ("upstream",),
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.outputs_served = Counter(
            "comfygate_outputs_served",
            "Files served by /view (status 200), by type (output, temp, input, other).",
            ("type",),
            registry=r,
        )
        # -- WebSocket ---------------------------------------------------------------------
        self.ws_open = Gauge(
            "comfygate_websocket_connections",
            "Relayed WebSocket connections currently open.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ws_frames = Counter(
            "comfygate_websocket_frames",
            "WebSocket frames relayed, by direction (down: to the client, up) and kind "
            "(text, preview, binary).",
            ("direction", "kind"),
            registry=r,
        )
        self.ws_bytes = Counter(
            "comfygate_websocket_bytes",
            "WebSocket payload bytes relayed, by direction and kind.",
            ("direction", "kind"),
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
        # -- security ----------------------------------------------------------------------
        self.auth_failures = Counter(
            "comfygate_auth_failures",
            "Authentication refused, by reason (the error type: token_expired, "
            "token_bad_signature, unauthenticated, session_expired, login_failed, ...).",
            ("reason",),
            registry=r,
        )
        self.csrf_refusals = Counter(
            "comfygate_csrf_refusals",
            "Cross-site requests refused, by reason (origin_not_allowed, csrf_failed, login_csrf).",
            ("reason",),
            registry=r,
        )
        self.role_refusals = Counter(
            "comfygate_role_refusals",
            "Authenticated requests refused for their role, by reason.",
            ("reason",),
            registry=r,
        )
        self.isolation_refusals = Counter(
            "comfygate_isolation_refusals",
            "Requests refused by tenant isolation, by reason.",
            ("reason",),
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
            multiprocess_mode="livemax",
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
        self.task_failures = Counter(
            "comfygate_task_failures",
            "Failures inside long-lived tasks (relays, fan-in links, watchers, reconcilers, "
            "pollers, sweepers), by task: each was logged and the task went on or restarted.",
            ("task",),
            registry=r,
        )
        self.redis_breaker_state = Gauge(
            "comfygate_redis_breaker_state",
            "Circuit breaker in front of Redis: 0 closed, 1 half-open, 2 open (the worst "
            "worker's).",
            registry=r,
            multiprocess_mode="livemax",
        )
        # -- inspected request bodies ---------------------------------------------------------
        self.inspected_bytes = Gauge(
            "comfygate_inspected_body_bytes_in_flight",
            "Bytes of request bodies the proxy holds to inspect them (JSON it reads), summed "
            "over live workers; bounded by server.max_inspected_bytes_in_flight_mb per worker.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inspected_refusals = Counter(
            "comfygate_inspected_body_refusals",
            "Inspected request bodies refused, by reason: process_bound (503), principal_bound "
            "(429), too_large (413), not_json, wrong_type, charset, content_encoding (400).",
            ("reason",),
            registry=r,
        )
        # -- workflow policy ----------------------------------------------------------------
        self.policy_refusals = Counter(
            "comfygate_policy_refusals",
            "Workflow violations refused by the policy, by violation type.",
            ("reason",),
            registry=r,
        )
        self.prompt_refusals = Counter(
            "comfygate_prompt_refusals",
            "POST /prompt bodies refused as unreadable or malformed (proxy.comfy), by the "
            "first problem's type, or refused before holding as ComfyUI's validation would "
            "refuse them (gateway queue), by ComfyUI's error type.",
            ("reason",),
            registry=r,
        )
        self.catalog_answers = Counter(
            "comfygate_catalog_answers",
            "/object_info answers by cache outcome: hit, stale (served while refreshing), "
            "miss (waited for ComfyUI), passthrough (ComfyUI's error passed on).",
            ("outcome",),
            registry=r,
        )
        self.catalog_refreshes = Counter(
            "comfygate_catalog_refreshes",
            "Fetches of ComfyUI's /object_info for the catalog cache, by outcome (ok, failed).",
            ("upstream", "outcome"),
            registry=r,
        )
        # Children already bound, by label values (see the module doc).
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._by_rule: dict[str, tuple[Histogram, Histogram, Counter, Counter]] = {}
        self._upstreams: dict[str, Histogram] = {}
        self._roles: dict[frozenset[str], Counter] = {}
        self.user_counter: UserCounter | None = None
        """Set by the app when ``metrics.per_user_top_n`` is on."""
        self.generation: GenerationWatcher | None = None
        """Set by the app's ``generation_tracker`` context (submissions are counted there)."""

    # -- the request path ------------------------------------------------------------------
    def request_finished(
        self, request: RequestLine, ctx: FinishedRequest, status: int, duration: float
    ) -> None:
        """Everything one finished request counts for (called once, from ``chain.observe``)."""
        rule = ctx.rule.name
        method = method_label(request.method)
        key = (rule, method, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(rule, method, str(status))
        counter.inc()
        if status != _WEBSOCKET_UPGRADE:  # a socket's lifetime is not a request duration
            per_rule = self._by_rule.get(rule)
            if per_rule is None:
                per_rule = self._by_rule[rule] = (
                    self.request_duration.labels(rule),
                    self.proxy_duration.labels(rule),
                    self.request_bytes.labels(rule),
                    self.response_bytes.labels(rule),
                )
            total, own, bytes_in, bytes_out = per_rule
            total.observe(duration)
            own.observe(max(0.0, duration - ctx.upstream_seconds))
            if ctx.bytes_in:
                bytes_in.inc(ctx.bytes_in)
            if ctx.bytes_out:
                bytes_out.inc(ctx.bytes_out)
            if ctx.upstream:
                upstream = self._upstreams.get(ctx.upstream)
                if upstream is None:
                    upstream = self._upstreams[ctx.upstream] = self.upstream_duration.labels(
                        ctx.upstream
                    )
                upstream.observe(ctx.upstream_seconds)
        if ctx.rejected_by:
            self._refused(ctx.rejected_by, ctx.error_type)
        elif status == 200 and method == "POST" and rule == "prompt":
            self._submitted(ctx)
        elif status == 200 and rule == "view" and ctx.path == "/view":
            kind = request.query.get("type", "output")
            self.outputs_served.labels(kind if kind in _VIEW_TYPES else "other").inc()
        elif rule == "login" and method == "POST" and status >= 400:
            self._login_failed(status)
        if self.user_counter is not None and ctx.principal is not None:
            self.user_counter.add(ctx.principal.subject)

    def _refused(self, guard: str, reason: str) -> None:
        """A guard refused the request: the security counter of that guard, if it has one
        (rate limits, quotas and the policy count in their own guards)."""
        if guard in _AUTH_GUARDS:
            self.auth_failures.labels(reason).inc()
        elif guard in _CSRF_GUARDS:
            self.csrf_refusals.labels(reason).inc()
        elif guard == "role":
            self.role_refusals.labels(reason).inc()
        elif guard == "isolation":
            self.isolation_refusals.labels(reason).inc()

    def _submitted(self, ctx: FinishedRequest) -> None:
        roles = ctx.principal.roles if ctx.principal is not None else frozenset()
        if self.generation is not None:
            self.generation.submitted(submitted_prompt_id(ctx), roles, ctx.upstream)
            return
        counter = self._roles.get(roles)
        if counter is None:
            counter = self._roles[roles] = self.prompts_submitted.labels(role_label(roles))
        counter.inc()

    def _login_failed(self, status: int) -> None:
        # The login page renders its own refusals (no guard): 401 wrong credentials, 429
        # throttled, 403 its CSRF check.
        if status == 403:
            self.csrf_refusals.labels("login_csrf").inc()
        elif status in _LOGIN_FAILURES:
            self.auth_failures.labels(_LOGIN_FAILURES[status]).inc()


METRICS = web.AppKey("comfygate.metrics", Metrics)
