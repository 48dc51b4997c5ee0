"""``create_app``: the whole request pipeline on one page.

::

    client -> observe -> render_errors -> resolve_route -> run_guards -> handler
                                                                         |- forward_http
                                                                         |- relay_websocket
                                                                         '- the proxy's own routes

Guards of every ComfyUI route, in order: origin -> auth -> csrf -> role, then the isolation guard
of the route family (submit: prompt/upload/view; read: history/queue/jobs/interrupt/ws). The
proxy's own routes (health, login, its static files) run no guard: they are the only public ones.
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
from proxy.health import healthz, readyz
from proxy.isolation.ownership import ownership_store
from proxy.isolation.read_guard import ReadGuard
from proxy.isolation.submit_guard import SubmitGuard
from proxy.observability.metrics import Metrics
from proxy.origin import OriginGuard
from proxy.redis_store import redis_client
from proxy.routes import OTHER, RULES
from proxy.settings import Settings
from proxy.state import (
    CONTEXT,
    HEADER_POLICY,
    LIFECYCLE,
    METRICS,
    POOL,
    SETTINGS,
    HeaderPolicy,
    Lifecycle,
)
from proxy.upstream.forward import forward_http
from proxy.upstream.pool import UpstreamPool
from proxy.upstream.websocket import relay_websocket


async def dispatch(request: web.Request) -> web.StreamResponse:
    """The terminal handler for ComfyUI's surface: WebSocket relay or HTTP forward."""
    rule = request[CONTEXT].rule
    if rule.websocket and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await relay_websocket(request)
    if rule.name == "users":  # only GET gets here (RoleGuard); the proxy manages ComfyUI users
        return await users_endpoint(request)
    return await forward_http(request)


def build_guards(settings: Settings) -> Mapping[str, Sequence[Guard]]:
    """Which guards run for which route rule, in order (the proxy's own routes have none)."""
    chain: tuple[Guard, ...] = (
        OriginGuard(settings.server),  # first: a foreign site learns nothing, not even 401 vs 403
        AuthGuard(),  # who is calling; everything after relies on ctx.principal
        CsrfGuard(),  # needs the principal's source (cookie vs bearer)
        RoleGuard(),  # admin-only families and actions
    )
    guards = {r.name: chain for r in (*RULES, OTHER)}
    # Isolation last: it narrows what an allowed request sees and touches.
    read, submit = ReadGuard(), SubmitGuard()
    for name in ("history", "queue", "jobs", "interrupt", "ws"):
        guards[name] = (*chain, read)
    for name in ("prompt", "upload", "view"):
        guards[name] = (*chain, submit)
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
            make_run_guards(build_guards(settings)),  # guards of the matched rule, in order
        ],
        client_max_size=int(settings.server.max_inspected_body_mb * 1024 * 1024),
        handler_args={"max_field_size": 65536},
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics(registry)
    app[POOL] = UpstreamPool(settings.upstream)
    app[LIFECYCLE] = Lifecycle()
    app[HEADER_POLICY] = build_header_policy(settings)
    # Order: the authenticator needs Redis (revocations) and the pool's session (JWKS).
    app.cleanup_ctx.extend(
        [_upstream_pool, redis_client, authenticator_context, ownership_store, relay_sweeper]
    )
    app.on_shutdown.append(_close_websockets)
    app.on_response_prepare.append(add_response_headers)

    # The proxy's own routes first (health checks at the root, whatever the base path).
    app.router.add_get("/healthz", healthz, name="healthz", allow_head=True)
    app.router.add_get("/readyz", readyz, name="readyz", allow_head=True)
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
    app.router.add_route("*", "/{tail:.*}", dispatch, name=FORWARD_ROUTE)
    return app
