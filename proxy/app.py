"""``create_app``: the whole request pipeline on one page.

::

    client -> observe -> render_errors -> resolve_route -> run_guards -> handler
                                                                         |- forward_http
                                                                         |- relay_websocket
                                                                         '- the proxy's own routes

The route table (``build_routes``, built once the resources exist) is the router: for every
rule (``proxy.routes.RuleName``) its guards, each built with its collaborators, and its
terminal handlers (one instance; several). Guards of every ComfyUI route, in order: origin ->
auth -> csrf -> role (and the family's own role checks) -> ratelimit (``POST /login`` checks
its own limit), then the family's guards: on ``/ws`` the queue quota's frame observer, then
isolation per operation (prompt/upload/view; history/queue/jobs/interrupt/ws), then the queue
quota (``POST /prompt``, isolation off). The proxy's own routes (health, login, its static
files, the frontend extension's script) run no guard: they are the only public ones, except
``POST /admin/reload`` (the chain, then admins only) and ``GET /comfygate/whoami`` (origin,
auth, csrf).

``POST /prompt`` runs the workflow policy (``proxy.policy.guard``) after the rate limit and
before everything that rewrites or records the prompt.

``POST /prompt`` also runs idempotency (a repeated ``Idempotency-Key``) and placement (which
instance; several instances) just before isolation; uploads run replication after it. The
``idempotency_finish`` middleware around the guards stores or frees a claimed key.

Inspected bodies (``POST`` prompt/queue/history/interrupt/jobs cancel) are read by one rule
(``proxy.request.bodies``): the body guard after the rate limit (after the policy on
``/prompt``), bounded in bytes in flight; ``release_inspected_bodies`` gives them back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from aiohttp import WSCloseCode, hdrs, web
from aiohttp.typedefs import Handler
from multidict import istr
from prometheus_client import CollectorRegistry

from proxy.auth.admin_guard import AdminGuard
from proxy.auth.authenticator import AUTH
from proxy.auth.comfy_users import COMFY_USERS
from proxy.auth.context import authenticator_context
from proxy.auth.guard import (
    AuthGuard,
    ClearRoleGuard,
    CsrfGuard,
    RedactArgvGuard,
    RoleGuard,
    SubmitRoleGuard,
    UsersReadOnlyGuard,
)
from proxy.auth.identity import IDENTITY_HEADERS, users_endpoint
from proxy.auth.login import CSRF_COOKIE, add_login_routes
from proxy.auth.oidc import FLOW_COOKIE, add_oidc_routes
from proxy.auth.origin_guard import OriginGuard
from proxy.auth.sweeper import relay_sweeper
from proxy.chain import (
    FORWARD_ROUTE,
    ROUTE_TABLE,
    Endpoint,
    Guard,
    RouteTable,
    add_response_headers,
    make_run_guards,
    observe,
    render_errors,
    resolve_route,
)
from proxy.cors import make_cors
from proxy.frontend import (
    WHOAMI_ROUTE,
    AdminStubGuard,
    ExtensionListGuard,
    add_frontend_routes,
    local_answers,
)
from proxy.health import healthz, readyz
from proxy.isolation.own_views import OwnViews
from proxy.isolation.read_guard import (
    HistoryGuard,
    InterruptGuard,
    JobsGuard,
    QueueGuard,
    ReadGuard,
    SocketGuard,
)
from proxy.isolation.submit_guard import PromptSubmitGuard, SubmitGuard, UploadGuard, ViewGuard
from proxy.jobs.api import ROUTES as JOBS_API_ROUTES
from proxy.jobs.context import install_jobs_api
from proxy.limits.enforce import RATE_LIMITS, rate_limits_context
from proxy.limits.guard import RateLimitGuard
from proxy.limits.quota.context import queue_quota_context
from proxy.limits.quota.guard import QueueQuotaGuard, SocketQuotaGuard
from proxy.limits.quota.service import QUEUE_QUOTA, QueueQuota
from proxy.monitoring.context import metrics_context
from proxy.monitoring.exposition import add_metrics_route, enable_user_counter
from proxy.multi.admin import (
    ADMIN_UPSTREAM_ROUTES,
    add_upstream_admin_routes,
    upstream_admin_guard,
)
from proxy.multi.dispatch import (
    dispatch_multi,
    is_multi,
    multi_history,
    multi_instance_context,
    multi_interrupt,
    multi_jobs,
    multi_prompt,
    multi_queue,
    multi_view,
    relay_websocket_multi,
)
from proxy.multi.idempotency import (
    IDEMPOTENCY,
    IdempotencyGuard,
    idempotency_context,
    idempotency_finish,
)
from proxy.multi.placement_guard import PlacementGuard
from proxy.multi.registry import registry_context
from proxy.multi.replication import ReplicationGuard
from proxy.observability.metrics import METRICS, Metrics
from proxy.policy.catalog.view import catalog_context, serve_catalog
from proxy.policy.guard import PolicyGuard
from proxy.policy.reload import RELOAD_ROUTE, add_reload_route, policy_reload_hook, reload_guard
from proxy.policy.schema_source import PolicySchemas
from proxy.policy.store import POLICY, PolicyStore
from proxy.redis.client import redis_client
from proxy.relay.forward import forward_http
from proxy.relay.websocket import relay_websocket
from proxy.request.bodies import (
    BODY_BUDGET,
    INSPECTED_RULES,
    BodyBudget,
    BodyGuard,
    release_inspected_bodies,
)
from proxy.request.prompt import NODE_SCHEMAS, PromptGuard, PromptReader
from proxy.routes import (
    COMFY_RULES,
    OTHER,
    OWN_ROUTES,
    OWN_RULES,
    RULES,
    ComfyRule,
    RouteRule,
    RuleName,
)
from proxy.scheduler.context import (
    ADMIN_SCHEDULER,
    add_scheduler_route,
    scheduler_context,
    with_scheduler,
)
from proxy.scheduler.keys import GATE
from proxy.settings import SETTINGS, Settings
from proxy.state import CONTEXT, HEADER_POLICY, LIFECYCLE, RELOAD_HOOKS, HeaderPolicy, Lifecycle
from proxy.tenancy.namespaces import FOLDERS
from proxy.tenancy.ownership import OWNERSHIP, ownership_store
from proxy.upstream.pool import POOL, UpstreamPool
from proxy.userdata.handler import serve_userdata, userdata_context


async def dispatch(request: web.Request) -> web.StreamResponse:
    """The terminal handler for ComfyUI's surface: the matched endpoint's (``build_routes``)."""
    ctx = request[CONTEXT]
    if ctx.answer is not None:  # a guard builds this answer itself (tenant history/jobs views)
        return await ctx.answer(request)
    return await request.app[ROUTE_TABLE].terminal(ctx.rule.name)(request)


def _socket(relay: Handler, fallback: Handler) -> Handler:
    """``/ws``: the relay for a WebSocket upgrade; a plain GET goes where any other would."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await relay(request)
        return await fallback(request)

    return handler


_OWN_HANDLERS: Mapping[ComfyRule, Handler] = {
    "users": users_endpoint,  # only GET gets here (role guards): the proxy manages ComfyUI users
    "object_info": serve_catalog,  # what the UI offers: filtered to the caller's policy
    "models": serve_catalog,
    "userdata": serve_userdata,  # each user's own, with or without --multi-user (home)
    "settings": serve_userdata,
}
"""ComfyUI families the proxy answers itself, with one instance or several."""
_MULTI_HANDLERS: Mapping[ComfyRule, Handler] = {
    "ws": _socket(relay_websocket_multi, dispatch_multi),
    "history": multi_history,
    "queue": multi_queue,
    "jobs": multi_jobs,
    "interrupt": multi_interrupt,
    "view": multi_view,
    "prompt": multi_prompt,
}
"""Several instances: merged views, sticky reads, fan-in (every other rule: ``dispatch_multi``)."""


def build_routes(app: web.Application) -> RouteTable:
    """The route table: for every rule, its guards in order (built here, once the resources
    exist, with their collaborators) and its terminal handlers.

    Guards of every ComfyUI route, in order: origin -> auth -> csrf -> role (then the family's
    own role checks) -> ratelimit -> body -> the family's guards (below) -> isolation.
    """
    settings = app[SETTINGS]
    roles = settings.roles
    multi = is_multi(app[POOL])
    rate_limited = settings.rate_limits.enabled
    quota = app[QUEUE_QUOTA] if rate_limited else None
    origin, csrf = OriginGuard(settings.server, settings.auth), CsrfGuard(settings.server)
    comfy_users = app.get(COMFY_USERS)

    def identity(rule: RouteRule) -> tuple[Guard, ...]:
        # First: a foreign site using a browser's ambient credentials learns nothing, not even
        # 401 vs 403 (bearer and query tokens are not ambient: see proxy.origin). Then who is
        # calling (everything after relies on ctx.principal), then CSRF (needs its source).
        return (origin, AuthGuard(rule, app[AUTH], settings, comfy_users), csrf)

    def terminal(rule: ComfyRule) -> tuple[Handler, Handler]:
        own = _OWN_HANDLERS.get(rule)
        if own is not None:
            return own, own
        single = _socket(relay_websocket, forward_http) if rule == "ws" else forward_http
        return single, _MULTI_HANDLERS.get(rule, dispatch_multi)

    prompts = PromptReader.of(app)  # how POST /prompt and the inspected bodies are read
    body, limited = BodyGuard(prompts.bodies), (RateLimitGuard,) if rate_limited else ()
    endpoints: dict[RuleName, Endpoint] = {}
    for rule in (*RULES, OTHER):
        name = rule.name
        assert name in COMFY_RULES  # the ComfyUI families: typed for the handlers' tables
        single, several = terminal(name)
        forward = several if multi else single
        guards: list[Guard] = [*identity(rule)]
        if name == "internal":
            # The stock frontend's own calls to /internal/*: an empty answer for those the
            # role guard would refuse (proxy.frontend); after auth and CSRF.
            guards.append(AdminStubGuard(roles))
        guards.append(RoleGuard(rule, roles))  # admin-only families
        guards.extend(_role_checks(name, rule, settings))
        if name == "static" and settings.auth.enabled:  # the account extension
            guards.append(ExtensionListGuard())
        # After the role guards (a refused request spends nothing), before isolation (whose
        # reads of Redis and bodies a flood must not reach). On every ComfyUI rule.
        guards.extend(g(rule, app[RATE_LIMITS]) for g in limited)
        if name in INSPECTED_RULES and name != "prompt":
            # Every inspected body read, bounded and checked once, after the rate limit,
            # before every guard that rewrites or records it (POST /prompt: see below).
            guards.append(body)
        guards.extend(_family_guards(app, name, forward, quota, prompts))
        endpoints[name] = Endpoint(rule, tuple(guards), single, several)
    for own in OWN_ROUTES:
        own_rule = OWN_RULES[own]
        own_guards: tuple[Guard, ...] = ()
        if own == WHOAMI_ROUTE:  # who is signed in: origin, auth, csrf (and the limit)
            own_guards = (*identity(own_rule), *(g(own_rule, app[RATE_LIMITS]) for g in limited))
        elif own == RELOAD_ROUTE:  # POST /admin/reload: admins only
            own_guards = (*identity(own_rule), RoleGuard(own_rule, roles), reload_guard(roles))
        elif own in JOBS_API_ROUTES:
            # The jobs API: who is calling, and the limit; each job's prompt then passes the
            # whole POST /prompt chain as an internal request (proxy.jobs.internal).
            own_guards = (
                *identity(own_rule),
                RoleGuard(own_rule, roles),
                *(g(own_rule, app[RATE_LIMITS]) for g in limited),
            )
        elif own == ADMIN_SCHEDULER:  # GET /admin/scheduler: admins only
            own_guards = (
                *identity(own_rule),
                RoleGuard(own_rule, roles),
                AdminGuard(ADMIN_SCHEDULER, "listing the gateway queue", roles),
            )
        elif own in ADMIN_UPSTREAM_ROUTES:  # /admin/upstreams[/{name}/drain|undrain]
            own_guards = (
                *identity(own_rule),
                RoleGuard(own_rule, roles),
                upstream_admin_guard(roles),
            )
        endpoints[own] = Endpoint(own_rule, own_guards)
    if settings.scheduler.enabled:  # the gateway queue (docs/scheduler.md)
        with_scheduler(endpoints, app[GATE], settings, prompts)
    return RouteTable(endpoints, multi=multi)


def _role_checks(name: ComfyRule, rule: RouteRule, settings: Settings) -> tuple[Guard, ...]:
    """The per-operation role checks of the few families that have some."""
    roles = settings.roles
    if name == "users":
        return (UsersReadOnlyGuard(),)
    if name == "prompt":
        return (SubmitRoleGuard(roles),)
    if name in ("queue", "history") and not settings.isolation.enabled:
        # With isolation on, the isolation guard turns a clear into "clear my own".
        return (ClearRoleGuard(rule, roles),)
    if name == "system_stats":
        return (RedactArgvGuard(roles),)
    return ()


def _family_guards(
    app: web.Application,
    name: ComfyRule,
    forward: Handler,
    quota: QueueQuota | None,
    prompts: PromptReader,
) -> tuple[Guard, ...]:
    """The guards of one family after the rate limit and the body guard: the policy and the
    prompt's reading, idempotency and placement, then isolation (it narrows what an allowed
    request sees and touches), replication, and the queue quota."""
    settings = app[SETTINGS]
    isolation, roles = settings.isolation, settings.roles

    def read(kind: type[ReadGuard]) -> ReadGuard:
        return kind(
            roles=roles,
            isolation=isolation,
            ownership=app[OWNERSHIP],
            metrics=app[METRICS],
            forward=forward,
            own_views=app[_OWN_VIEWS],
        )

    def submit(kind: type[SubmitGuard]) -> SubmitGuard:
        return kind(
            roles=roles,
            isolation=isolation,
            ownership=app[OWNERSHIP],
            folders=app[FOLDERS],
            pool=app[POOL],
            quota=quota,
        )

    if name == "prompt":
        guards: list[Guard] = []
        if settings.policy.enabled:
            # After the rate limit (a flood is refused before its bodies are parsed), before
            # isolation (which rewrites what the policy allowed).
            guards.append(PolicyGuard(app[POLICY], app[METRICS], isolation=isolation.enabled))
        # Every POST /prompt is read once (through the bounded body reader) into the canonical
        # prompt model and forwarded as the proxy serialises it; then a repeated
        # Idempotency-Key is answered from memory, placement chooses the instance (several
        # instances), under whose name isolation records the prompt.
        guards += [
            PromptGuard(prompts),
            IdempotencyGuard(app[IDEMPOTENCY], settings.upstream, app[METRICS], prompts),
            PlacementGuard(app[POOL], app[METRICS], settings.upstream.placement),
            submit(PromptSubmitGuard),
        ]
        if quota is not None and not isolation.enabled:
            # Counts the prompt itself only with isolation off (isolation counts it once it
            # set the id).
            guards.append(QueueQuotaGuard(quota, app[POOL]))
        return tuple(guards)
    if name == "ws":
        # The quota's observer first: it must see the frames isolation drops.
        observer = (SocketQuotaGuard(quota),) if quota is not None else ()
        return (*observer, read(SocketGuard))
    if name == "upload":
        # Several instances: an upload goes to every healthy one (after isolation rewrote it).
        replication = ReplicationGuard(app[POOL], settings.upstream.placement, app[METRICS])
        return (submit(UploadGuard), replication)
    if name == "view":
        return (submit(ViewGuard),)
    read_guards: Mapping[ComfyRule, type[ReadGuard]] = {
        "history": HistoryGuard,
        "queue": QueueGuard,
        "jobs": JobsGuard,
        "interrupt": InterruptGuard,
    }
    guard = read_guards.get(name)
    return (read(guard),) if guard is not None else ()


async def _route_table(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``, last: the route table, once every collaborator of the guards exists."""
    app[_OWN_VIEWS] = OwnViews()
    app[ROUTE_TABLE] = build_routes(app)
    yield


_OWN_VIEWS = web.AppKey("comfygate.own_views", OwnViews)
"""The tenants' history and jobs views (shared by their two guards)."""


def build_header_policy(settings: Settings) -> HeaderPolicy:
    """Client headers and cookies that never reach ComfyUI."""
    return HeaderPolicy(
        # The forward-auth headers too, whoever sent them (proxy.auth.forward_auth).
        dropped=IDENTITY_HEADERS | {istr(h) for h in settings.auth.forward_auth.headers},
        dropped_cookies=frozenset({settings.auth.session.cookie_name, CSRF_COOKIE, FLOW_COOKIE}),
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
            make_run_guards(),  # guards of the matched endpoint (ROUTE_TABLE), in order
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
    app[NODE_SCHEMAS] = PolicySchemas(app)  # what prompts are read with (its catalog, its store)
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
            scheduler_context,  # the gateway queue: needs Redis, the pool, ownership, quota
            _route_table,  # last: the guards are built with every resource above
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
        # (docs/comfyui-protocol.md#url-building-and-sub-paths).
        async def to_base_dir(request: web.Request) -> web.StreamResponse:
            query = f"?{request.query_string}" if request.query_string else ""
            raise web.HTTPPermanentRedirect(f"{base}/{query}")

        app.router.add_route("*", base, to_base_dir, name="base_redirect")
    # Public: the login page and its assets (handlers get their collaborators at startup).
    add_login_routes(app, base_path=base, settings=settings.auth)
    add_oidc_routes(app, base_path=base)  # sign in with an OpenID provider (public)
    add_frontend_routes(app, base_path=base)  # the account extension and whoami
    add_reload_route(app, base_path=base)  # admins only (reload_guard, wired by route name)
    add_upstream_admin_routes(app, base_path=base)  # admins only (wired by route name)
    add_scheduler_route(app, base_path=base)  # admins only (wired by route name)
    install_jobs_api(app, settings)  # /comfygate/v1 (proxy.jobs); before the catch-all
    app.router.add_route("*", "/{tail:.*}", dispatch, name=FORWARD_ROUTE)
    return app
