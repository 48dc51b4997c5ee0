"""``create_app``: the whole request pipeline on one page.

::

    client -> observe -> render_errors -> resolve_route -> run_guards -> handler
                                                                         |- forward_http
                                                                         |- relay_websocket
                                                                         '- the proxy's own routes

Guards of every ComfyUI route, in order: origin -> auth -> csrf -> role -> ratelimit (not on
static files; ``POST /login`` checks its own limit), then the isolation guard of the route
family (submit: prompt/upload/view; read: history/queue/jobs/interrupt/ws), then the queue
quota (prompt, ws). The proxy's own routes (health, login, its static files, the frontend
extension's script) run no guard: they are the only public ones, except ``POST /admin/reload``
(the chain, then admins only) and ``GET /comfygate/whoami`` (origin, auth, csrf).

``POST /prompt`` runs the workflow policy (``proxy.policy.guard``) after the rate limit and
before everything that rewrites or records the prompt.

``POST /prompt`` also runs idempotency (a repeated ``Idempotency-Key``) and placement (which
instance; several instances) just before isolation; uploads run replication after it. The
``idempotency_finish`` middleware around the guards stores or frees a claimed key.

Inspected bodies (``POST`` prompt/queue/history/interrupt/jobs cancel) are read by one rule
(``proxy.limits.bodies``): the body guard after the rate limit (after the policy on
``/prompt``), bounded in bytes in flight; ``release_inspected_bodies`` gives them back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

from aiohttp import WSCloseCode, hdrs, web
from prometheus_client import CollectorRegistry

from proxy.auth.authenticator import authenticator_context
from proxy.auth.guard import AuthGuard, CsrfGuard, RoleGuard
from proxy.auth.identity import IDENTITY_HEADERS, users_endpoint
from proxy.auth.login import CSRF_COOKIE, add_login_routes
from proxy.auth.sweeper import relay_sweeper
from proxy.chain import (
    FORWARD_ROUTE,
    Guard,
    add_response_headers,
    make_run_guards,
    observe,
    render_errors,
    resolve_route,
)
from proxy.cors import make_cors
from proxy.health import healthz, readyz
from proxy.isolation.ownership import ownership_store
from proxy.isolation.read_guard import ReadGuard
from proxy.isolation.submit_guard import SubmitGuard
from proxy.jobs.api import ROUTES as JOBS_API_ROUTES
from proxy.jobs.context import install_jobs_api
from proxy.limits.bodies import (
    BODY_BUDGET,
    INSPECTED_RULES,
    BodyBudget,
    BodyGuard,
    release_inspected_bodies,
)
from proxy.limits.classes import limited_rule
from proxy.limits.enforce import rate_limits_context
from proxy.limits.guard import RateLimitGuard
from proxy.limits.quota_guard import QueueQuotaGuard
from proxy.limits.quota_service import queue_quota_context
from proxy.observability.context import metrics_context
from proxy.observability.exposition import add_metrics_route, enable_user_counter
from proxy.observability.metrics import Metrics
from proxy.origin import OriginGuard
from proxy.policy.catalog import CATALOG_RULES, catalog_context, serve_catalog
from proxy.policy.guard import PolicyGuard
from proxy.policy.reload import RELOAD_ROUTE, add_reload_route, policy_reload_hook, reload_guard
from proxy.policy.store import PolicyStore
from proxy.redis_store import redis_client
from proxy.routes import OTHER, RULES
from proxy.settings import Settings
from proxy.state import (
    CONTEXT,
    HEADER_POLICY,
    LIFECYCLE,
    METRICS,
    POLICY,
    POOL,
    RELOAD_HOOKS,
    SETTINGS,
    HeaderPolicy,
    Lifecycle,
)
from proxy.upstream.admin import (
    ADMIN_UPSTREAM_ROUTES,
    add_upstream_admin_routes,
    upstream_admin_guard,
)
from proxy.upstream.forward import forward_http
from proxy.upstream.idempotency import IdempotencyGuard, idempotency_context, idempotency_finish
from proxy.upstream.multi import (
    dispatch_multi,
    is_multi,
    multi_instance_context,
    relay_websocket_multi,
)
from proxy.upstream.placement_guard import PlacementGuard
from proxy.upstream.pool import UpstreamPool
from proxy.upstream.registry import registry_context
from proxy.upstream.replication import ReplicationGuard
from proxy.upstream.websocket import relay_websocket
from proxy.userdata.handler import USERDATA_RULES, serve_userdata, userdata_context
from proxy.web.frontend import (
    WHOAMI_ROUTE,
    AdminStubGuard,
    ExtensionListGuard,
    add_frontend_routes,
    local_answers,
)
from proxy.workflow.request import PromptGuard


async def dispatch(request: web.Request) -> web.StreamResponse:
    """The terminal handler for ComfyUI's surface: WebSocket relay or HTTP forward."""
    ctx = request[CONTEXT]
    if ctx.answer is not None:  # a guard builds this answer itself (tenant history/jobs views)
        return await ctx.answer(request)
    rule = ctx.rule
    multi = is_multi(request.app[POOL])  # several instances: merged views, sticky, fan-in
    if rule.websocket and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await (relay_websocket_multi if multi else relay_websocket)(request)
    if rule.name == "users":  # only GET gets here (RoleGuard); the proxy manages ComfyUI users
        return await users_endpoint(request)
    if rule.name in CATALOG_RULES:  # what the UI offers: filtered to the caller's policy
        return await serve_catalog(request)
    if rule.name in USERDATA_RULES:  # each user's own, with or without --multi-user (home)
        return await serve_userdata(request)
    if multi:
        return await dispatch_multi(request)
    return await forward_http(request)


def build_guards(settings: Settings) -> Mapping[str, Sequence[Guard]]:
    """Which guards run for which route rule, in order (the proxy's own routes have none)."""
    chain: tuple[Guard, ...] = (
        # First: a foreign site using a browser's ambient credentials learns nothing, not even
        # 401 vs 403 (bearer and query tokens are not ambient: see proxy.origin).
        OriginGuard(settings.server, settings.auth),
        AuthGuard(),  # who is calling; everything after relies on ctx.principal
        CsrfGuard(),  # needs the principal's source (cookie vs bearer)
        RoleGuard(),  # admin-only families and actions
    )
    guards = {r.name: chain for r in (*RULES, OTHER)}
    # The stock frontend's own calls to /internal/*: an empty answer for those the role guard
    # would refuse (proxy.web.frontend); after auth and CSRF, before the role guard.
    guards["internal"] = (*chain[:3], AdminStubGuard(), *chain[3:])
    if settings.auth.enabled:  # the account extension (who is signed in, sign out)
        guards["static"] = (*guards["static"], ExtensionListGuard())
    guards[WHOAMI_ROUTE] = chain[:3]
    for name in JOBS_API_ROUTES:  # the jobs API: who is calling; its jobs pass the prompt chain
        guards[name] = chain
    if settings.rate_limits.enabled:
        # After the role guard (a refused request spends nothing), before isolation (whose
        # reads of Redis and bodies a flood must not reach). On every ComfyUI rule.
        limit = RateLimitGuard()
        guards = {name: (*g, limit) if limited_rule(name) else g for name, g in guards.items()}
    # Every inspected body read, bounded and checked once, after the rate limit (a flood is
    # refused before its bodies are read), before every guard that rewrites or records it; on
    # POST /prompt after the policy, which refuses a body over the role's size unread.
    body = BodyGuard()
    for name in INSPECTED_RULES:
        guards[name] = (*guards[name], body) if name != "prompt" else guards[name]  # see below
    if settings.policy.enabled:
        # After the rate limit (a flood is refused before its bodies are parsed), before
        # isolation (which rewrites what the policy allowed).
        guards["prompt"] = (*guards["prompt"], PolicyGuard())
    # Every POST /prompt is read once (through the same bounded body reader) into the canonical
    # prompt model and forwarded as the proxy serialises it (after the policy, which reads it
    # first to report its problems too).
    guards["prompt"] = (*guards["prompt"], PromptGuard())
    guards[RELOAD_ROUTE] = (*chain, reload_guard())  # POST /admin/reload: admins only
    upstreams_admin = upstream_admin_guard()  # /admin/upstreams[/{name}/drain|undrain]
    for name in ADMIN_UPSTREAM_ROUTES:
        guards[name] = (*chain, upstreams_admin)
    # A repeated Idempotency-Key is answered from memory; then placement chooses the instance
    # (several instances), under whose name isolation records the prompt.
    guards["prompt"] = (*guards["prompt"], IdempotencyGuard(), PlacementGuard())
    # Isolation last: it narrows what an allowed request sees and touches.
    read, submit = ReadGuard(), SubmitGuard()
    for name in ("history", "queue", "jobs", "interrupt", "ws"):
        guards[name] = (*guards[name], read)
    for name in ("prompt", "upload", "view"):
        guards[name] = (*guards[name], submit)
    # Several instances: an upload goes to every healthy one (after isolation rewrote it).
    guards["upload"] = (*guards["upload"], ReplicationGuard())
    if settings.rate_limits.enabled:
        # Queue quota last: on /ws it wraps isolation's frame filter; on POST /prompt it counts
        # the prompt itself only with isolation off (isolation counts it once it set the id).
        quota = QueueQuotaGuard()
        for name in ("prompt", "ws"):
            guards[name] = (*guards[name], quota)
    return guards


def build_header_policy(settings: Settings) -> HeaderPolicy:
    """Client headers and cookies that never reach ComfyUI."""
    return HeaderPolicy(
        dropped=IDENTITY_HEADERS,
        dropped_cookies=frozenset({settings.auth.session.cookie_name, CSRF_COOKIE}),
    )


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    pool = app[POOL]
    await pool.start()
    yield
    await pool.close()


async def _close_websockets(app: web.Application) -> None:
    """``on_shutdown``: tell every relayed client the server is going away (1001)."""
    for ws in list(app[LIFECYCLE].websockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    """Build the application. Nothing with a lifetime is created before ``cleanup_ctx`` runs."""
    app = web.Application(
        middlewares=[
            observe,  # outermost: request id + context, and the one log line for every outcome
            render_errors,  # every error below becomes a JSON response observe can count
            resolve_route,  # rule decided before guards; a malformed path is a rendered 400
            # CORS for API consumers on other origins: preflights answered, never forwarded.
            make_cors(settings.server.cors_origins, {FORWARD_ROUTE, WHOAMI_ROUTE}),
            idempotency_finish,  # stores (or frees) a claimed Idempotency-Key's answer
            release_inspected_bodies,  # gives back the request's share of the body bound
            local_answers,  # a guard's own answer (the frontend's admin-only calls)
            make_run_guards(build_guards(settings)),  # guards of the matched rule, in order
        ],
        client_max_size=int(settings.server.max_inspected_body_mb * 1024 * 1024),
        handler_args={"max_field_size": 65536},
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics(registry)
    app[BODY_BUDGET] = BodyBudget.from_settings(settings.server, app[METRICS])
    enable_user_counter(settings.metrics, app[METRICS])  # opt-in per-user counts
    app[POOL] = UpstreamPool(settings.upstream)
    app[LIFECYCLE] = Lifecycle()
    app[HEADER_POLICY] = build_header_policy(settings)
    app[RELOAD_HOOKS] = []  # run on SIGHUP (proxy/server.py)
    app[POLICY] = PolicyStore(settings.policy, settings.roles)  # a bad policy file fails here
    app[RELOAD_HOOKS].append(policy_reload_hook(app))
    # Order: the authenticator needs Redis (revocations) and the pool's session (JWKS).
    app.cleanup_ctx.extend(
        [
            _upstream_pool,
            redis_client,
            rate_limits_context,  # needs Redis; before anything serves
            authenticator_context,
            ownership_store,
            metrics_context,  # needs Redis and the pool: upstream probe, generation tracker
            queue_quota_context,  # needs Redis, the pool and the rate limits; runs a poller
            relay_sweeper,
            catalog_context,  # fetches through the pool; filters with app[POLICY]
            multi_instance_context,  # several instances: fan-in, file locations, lost prompts
            idempotency_context,  # needs Redis
            registry_context,  # needs Redis and the catalog: discovery, health, capabilities
            userdata_context,  # needs the pool: which instances run with --multi-user
        ]
    )
    app.on_shutdown.append(_close_websockets)
    app.on_response_prepare.append(add_response_headers)

    # The proxy's own routes first (health checks at the root, whatever the base path).
    app.router.add_get("/healthz", healthz, name="healthz", allow_head=True)
    app.router.add_get("/readyz", readyz, name="readyz", allow_head=True)
    if settings.metrics.enabled and settings.metrics.on_main_port:
        add_metrics_route(app, settings.metrics)  # else a listener of its own (server.py)
    base = settings.server.base_path
    if base:
        # The frontend derives its API base from the page path: it must be served at "/comfy/"
        # (protocol doc 8.1).
        async def to_base_dir(request: web.Request) -> web.StreamResponse:
            query = f"?{request.query_string}" if request.query_string else ""
            raise web.HTTPPermanentRedirect(f"{base}/{query}")

        app.router.add_route("*", base, to_base_dir, name="base_redirect")
    # Public: the login page and its assets (handlers get their collaborators at startup).
    add_login_routes(app, base_path=base, settings=settings.auth)
    add_frontend_routes(app, base_path=base)  # the account extension and whoami
    add_reload_route(app, base_path=base)  # admins only (reload_guard, wired by route name)
    add_upstream_admin_routes(app, base_path=base)  # admins only (wired by route name)
    install_jobs_api(app, settings)  # /comfygate/v1 (proxy.jobs); before the catch-all
    app.router.add_route("*", "/{tail:.*}", dispatch, name=FORWARD_ROUTE)
    return app
