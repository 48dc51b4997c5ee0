"""The identity guards, in the order ``app.build_routes`` runs them after the origin check:

1. :class:`AuthGuard` - who is calling (else 401, or 302 to the login page for a browser page).
2. :class:`CsrfGuard` - a cookie-authenticated state change must prove it comes from our pages.
3. :class:`RoleGuard` - may the caller's roles use the route family at all; then the small
   per-operation role checks of a few families: :class:`UsersReadOnlyGuard` (``users``),
   :class:`SubmitRoleGuard` (``prompt``), :class:`ClearRoleGuard` (``queue``/``history``
   without isolation), :class:`RedactArgvGuard` (``system_stats``).

Each is built once per route (``app.build_routes``) with what it needs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

import orjson
from aiohttp import hdrs, web

from proxy.auth.identity import COMFY_USER, identity_headers
from proxy.auth.revocation import FAIL_OPEN
from proxy.errors import Forbidden, Unauthenticated
from proxy.limits.classes import route_class
from proxy.origin import browser_origin, is_own_origin
from proxy.principal import AMBIENT_SOURCES, Principal
from proxy.request.bodies import read_json_body
from proxy.request.websocket import is_websocket, is_websocket_handshake
from proxy.routes import RouteRule
from proxy.settings import SETTINGS, ServerSettings, Settings
from proxy.settings.auth import RoleSettings
from proxy.state import RequestContext
from proxy.web.assets import is_public_asset

if TYPE_CHECKING:
    from proxy.auth.authenticator import Authenticator
    from proxy.auth.comfy_users import ComfyUserDirectory

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Route families only an admin (or a role that lists them in allow_routes) may use at all:
# server logs and absolute paths, ComfyUI-Manager (installs code), server-side model downloads,
# and memory management affecting everyone.
ADMIN_RULES = frozenset({"internal", "manager", "assets_admin", "free"})


PUBLIC = Principal("anonymous", frozenset(), "anonymous")
"""Whoever fetches one of the frontend's public files without a valid credential: no role
(nothing beyond the file is allowed), rate-limited by client address."""


class AuthGuard:
    """Authenticates the caller and sets ``ctx.principal`` and the identity sent to ComfyUI."""

    name = "auth"

    def __init__(
        self,
        rule: RouteRule,
        auth: Authenticator,
        settings: Settings,
        comfy_users: ComfyUserDirectory | None = None,
    ) -> None:
        self._rule = rule
        self._auth = auth
        self._settings = settings.auth
        self._limits = settings.rate_limits
        self._comfy_users = comfy_users
        self._api_route = not rule.websocket and rule.name != "static"

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        auth = self._auth
        # A query token is a credential only where a browser cannot send headers: the
        # handshake of ComfyUI's socket; on the HTTP API routes only when opted in
        # (auth.query_token_on_http). Anywhere else it is not even looked at.
        websocket = self._rule.websocket and is_websocket_handshake(request)
        api_route = self._api_route
        # The route class's Redis fail mode also governs the denylist lookup (see
        # revocation.FailModeRevocations): read-only classes stay up while Redis is down.
        token = FAIL_OPEN.set(self._fails_open(request.method, websocket=websocket))
        try:
            principal, session = await auth.authenticate(
                request, websocket=websocket, api_route=api_route
            )
        except Unauthenticated:
            if not is_public_asset(request, ctx):
                raise
            # The stock frontend's own files (proxy.web.assets), e.g. the manifest a browser
            # fetches without cookies: served to anyone, with no identity sent to ComfyUI.
            ctx.principal = PUBLIC
            return
        finally:
            FAIL_OPEN.reset(token)
        ctx.principal = principal
        # SECURITY: a token in the query is a credential (the caller's, or one next to the
        # credential that decided, or a stale one): none reaches ComfyUI or its logs, in any
        # encoding or number of copies.
        ctx.upstream_path = without_query_param(ctx.upstream_path, "token")
        settings = self._settings
        ctx.upstream_headers.update(identity_headers(principal, settings.forward_user_headers))
        if settings.comfy_multi_user and self._comfy_users is not None:
            comfy_id = await self._comfy_users.user_id(principal.comfy_user)
            ctx.upstream_headers[COMFY_USER] = comfy_id
        if session is not None and auth.sessions.needs_renewal(session):
            value, renewed = auth.sessions.renew(session)
            ctx.response_headers.append(
                (hdrs.SET_COOKIE, session_cookie(request, value, renewed.absolute_expires_at))
            )

    def _fails_open(self, method: str, *, websocket: bool) -> bool:
        if self._rule.name == "static":  # the frontend's own files
            return True
        cls = route_class(self._rule, method, websocket=websocket)
        return cls is not None and self._limits.fail_mode(cls) == "open"


def without_query_param(raw_path: str, name: str) -> str:
    """``raw_path`` without every parameter whose decoded name is ``name`` (decoded as yarl
    decodes it, so ``%74oken`` is ``token``); everything else kept byte-exact."""
    path, sep, query = raw_path.partition("?")
    if not sep:
        return raw_path
    kept = [p for p in query.split("&") if p and unquote_plus(p.split("=", 1)[0]) != name]
    return f"{path}?{'&'.join(kept)}" if kept else path


def session_cookie(request: web.Request, value: str, absolute_expiry: float) -> str:
    """A ``Set-Cookie`` value for the session: HttpOnly, SameSite=Lax, Secure over https."""
    settings = request.app[SETTINGS]
    cookie: SimpleCookie = SimpleCookie()
    name = settings.auth.session.cookie_name
    cookie[name] = value
    morsel = cookie[name]
    morsel["path"] = settings.server.base_path or "/"
    morsel["httponly"] = True
    morsel["samesite"] = "Lax"
    max_age = max(0, int(absolute_expiry - time.time()))
    morsel["max-age"] = str(max_age)
    if cookie_secure(request):
        morsel["secure"] = True
    return morsel.OutputString()


def cookie_secure(request: web.Request) -> bool:
    """Whether cookies get the Secure flag (``auth.session.secure``)."""
    mode = request.app[SETTINGS].auth.session.secure
    if mode != "auto":
        return mode == "always"
    server = request.app[SETTINGS].server
    return server.public_url.startswith("https://") or browser_origin(request, server)[0] == "https"


class CsrfGuard:
    """State changes (and WebSocket handshakes) authenticated by an *ambient* credential - the
    session cookie or HTTP Basic, which a browser attaches by itself - must carry our origin.

    The origin guard already refused any *foreign* ``Origin``; here a missing one is refused too,
    unless ``Referer`` names our origin. Bearer and query tokens are exempt: a browser never
    attaches them on its own.

    HTTP Basic without any ``Origin`` is let through: browsers send ``Origin`` on every
    unsafe-method request and WebSocket handshake (the Fetch standard), which is the only way
    cached Basic credentials can be made to ride along, so a request without one comes from an
    API client (``requests``, ``curl``, Node's ``fetch``) - the clients Basic is accepted for. An
    opaque ``Origin: null`` is a browser's and needs our ``Referer`` like a cookie request.
    """

    name = "csrf"

    def __init__(self, server: ServerSettings) -> None:
        self._server = server

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is None or principal.source not in AMBIENT_SOURCES:
            return
        if request.method not in UNSAFE_METHODS and not is_websocket(request):
            return
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and origin != "null":
            return  # already checked against our own and the allowed origins
        if origin is None and principal.source == "basic":
            return  # not a browser (see the class docstring)
        referer = request.headers.get(hdrs.REFERER)
        if referer and is_own_origin(referer, request, self._server):
            return
        raise Forbidden(
            "cross-site request refused: no Origin or Referer from this site",
            error_type="csrf_failed",
        )


class RoleGuard:
    """Whether the caller's roles may use the route family at all: admin-only families
    (:data:`ADMIN_RULES`) need a role allowing them. Every other family passes here (the
    per-operation checks below decide on its actions)."""

    name = "role"

    def __init__(self, rule: RouteRule, roles: Mapping[str, RoleSettings]) -> None:
        self._rule = rule.name
        self._roles = roles
        self._admin_only = rule.name in ADMIN_RULES

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = _principal(ctx)
        if self._admin_only and not principal.may_use(self._rule, self._roles):
            raise Forbidden(f"your role may not use {ctx.path}", error_type="forbidden_role")


class UsersReadOnlyGuard:
    """``/users``: ComfyUI's user list is read (GET/HEAD); its users are the proxy's to manage."""

    name = "role"

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if request.method not in ("GET", "HEAD"):
            raise Forbidden("ComfyUI users are managed by the proxy", error_type="forbidden_role")


class SubmitRoleGuard:
    """``POST /prompt``: only roles that may submit (``roles.<r>.submit``) queue prompts."""

    name = "role"

    def __init__(self, roles: Mapping[str, RoleSettings]) -> None:
        self._roles = roles

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = _principal(ctx)
        roles = self._roles
        if request.method != "POST" or principal.may_use("prompt", roles):
            return
        if not any(roles[r].submit for r in principal.roles if r in roles):
            raise Forbidden("your role may not queue prompts", error_type="forbidden_role")


class ClearRoleGuard:
    """``POST /queue`` and ``POST /history`` with isolation off: clearing everyone's is for
    roles allowed the family (with isolation on, its guard turns a clear into "clear mine")."""

    name = "role"

    def __init__(self, rule: RouteRule, roles: Mapping[str, RoleSettings]) -> None:
        self._rule = rule.name
        self._roles = roles

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = _principal(ctx)
        if request.method != "POST" or principal.may_use(self._rule, self._roles):
            return
        body = await read_json_body(request, ctx)
        if isinstance(body, dict) and body.get("clear"):
            raise Forbidden(
                f"clearing the whole {self._rule} is for admins", error_type="forbidden_role"
            )


class RedactArgvGuard:
    """``GET /system_stats``: ComfyUI's command line is shown to roles allowed the family only."""

    name = "role"

    def __init__(self, roles: Mapping[str, RoleSettings]) -> None:
        self._roles = roles

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = _principal(ctx)
        if request.method in ("GET", "HEAD") and not principal.may_use("system_stats", self._roles):
            ctx.response_filters.append(redact_argv)  # HEAD too: it would tell the argv's length


def _principal(ctx: RequestContext) -> Principal:
    if ctx.principal is None:  # pragma: no cover - AuthGuard runs first
        raise Forbidden("not authenticated", error_type="forbidden")
    return ctx.principal


async def redact_argv(status: int, body: bytes) -> bytes:
    """``/system_stats`` lists ComfyUI's full command line; only admins see it."""
    if status != 200:
        return body
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    system = data.get("system") if isinstance(data, dict) else None
    if isinstance(system, dict) and "argv" in system:
        system["argv"] = []
        return orjson.dumps(data)
    return body
