"""The stock frontend behind the proxy: who is signed in, signing out, and the admin-only routes
the frontend calls on its own.

**The account extension.** ComfyUI's frontend loads every script that ``GET /extensions`` lists
(``api.getExtensions()`` then ``import(api.fileURL(url))``, frontend 1.27); a script registers
itself with ``app.registerExtension``. The proxy adds its own script to that list
(:class:`ExtensionListGuard`) and serves it from its static files (``/extensions/comfygate/
account.js``, never forwarded). The script asks ``GET /comfygate/whoami`` who is signed in and
shows the name with a "Sign out" button in the top bar (the legacy ``app.menu.settingsGroup``
button API, which 1.27 still mounts in the top menu bar) and a "Sign out" command in the
menu. Signing out posts the login page's form (``POST /logout`` with its CSRF value, which
``whoami`` hands to the page's own scripts only: the answer is JSON, no-store, and never
readable cross-origin with cookies - ``proxy.cors`` sends no ``Allow-Credentials``).

**Admin-only routes the frontend calls by itself** (found in the 1.27.10 bundle:
``api.getLogs``, ``getRawLogs``, ``subscribeLogs``, ``getFolderPaths``, all ``/internal/*``):
for a caller whose roles may not use ``internal`` they are answered here, empty and in
ComfyUI's shape, and never forwarded (:class:`AdminStubGuard`):

=================================  =========================================================
``GET /internal/logs``             ``""`` (the error report's "server logs"; a 403 made a red
                                   "Failed to fetch server logs" toast on every error)
``GET /internal/logs/raw``         ``{"entries": [], "size": {"cols": 80, "rows": 24}}``
``PATCH /internal/logs/subscribe`` 200, empty (SDKs call it on every start)
``GET /internal/folder_paths``     ``{}``
=================================  =========================================================

Everything else under ``/internal`` (``/internal/files``...) stays refused (403). The Manager's
routes are not called for regular users: the frontend enables the Manager only when ComfyUI's
``argv`` (``/system_stats``) has ``--enable-manager``, and the proxy empties ``argv`` for
non-admins. ``/free`` is called only when a user clicks "Unload models": a 403 then is right.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from proxy.auth.login import LOGIN_PAGE
from proxy.settings import SETTINGS
from proxy.settings.auth import RoleSettings
from proxy.state import CONTEXT, RequestContext
from proxy.web import STATIC_DIR

EXTENSION_URL = "/extensions/comfygate/account.js"
"""Where the frontend imports the account extension from (under the base path). Under
``/extensions/<dir>/`` so its relative imports (``../../scripts/app.js``) resolve as for any
custom node's script."""
EXTENSION_FILE = STATIC_DIR / "account.js"
EXTENSION_ROUTE = "frontend_extension"
WHOAMI_URL = "/comfygate/whoami"
WHOAMI_ROUTE = "whoami"

TERMINAL_SIZE = {"cols": 80, "rows": 24}
"""What ``/internal/logs/raw`` reports as the server's terminal size when it shows nothing."""


class LocalAnswer(Exception):
    """Raised by a guard that answers the request itself: :func:`local_answers` returns
    ``response`` and nothing is forwarded."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__()
        self.response = response


@web.middleware
async def local_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns a guard's :class:`LocalAnswer` into the response (just outside the guards)."""
    try:
        return await handler(request)
    except LocalAnswer as answer:
        return answer.response


def _json(body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


_STUBS: dict[tuple[str, str], object] = {
    ("GET", "/internal/logs"): "",
    ("GET", "/internal/logs/raw"): {"entries": [], "size": TERMINAL_SIZE},
    ("GET", "/internal/folder_paths"): {},
}
_NO_OP = ("PATCH", "/internal/logs/subscribe")


def stub_answer(method: str, path: str) -> web.Response | None:
    """The empty answer to one of the frontend's own admin-only calls; None for any other."""
    if (method, path) == _NO_OP:
        return web.Response(status=200)
    body = _STUBS.get(("GET" if method == "HEAD" else method, path))
    return None if body is None else _json(body)


class AdminStubGuard:
    """Answers the frontend's own calls to ``/internal/*`` for callers whose roles may not use
    ``internal`` (see the module docstring). Runs after authentication and CSRF (a cookie
    request from elsewhere is still refused), before the role guard."""

    name = "admin_stub"

    def __init__(self, roles: Mapping[str, RoleSettings]) -> None:
        self._roles = roles

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is None or principal.may_use(ctx.rule.name, self._roles):
            return  # admins (and roles allowed "internal") reach ComfyUI's real answer
        answer = stub_answer(request.method, ctx.path)
        if answer is not None:
            raise LocalAnswer(answer)


class ExtensionListGuard:
    """Adds the account extension to ComfyUI's answer to ``GET /extensions`` (rule ``static``)."""

    name = "extension_list"

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if request.method == hdrs.METH_GET and ctx.path == "/extensions":
            ctx.response_filters.append(add_extension)


async def add_extension(status: int, body: bytes) -> bytes:
    """ComfyUI's extension list (a JSON array of script URLs) with the account extension
    appended; anything else is passed on as it is."""
    if status != 200:
        return body
    try:
        listed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(listed, list) or EXTENSION_URL in listed:
        return body
    return orjson.dumps([*listed, EXTENSION_URL])


async def serve_extension(request: web.Request) -> web.StreamResponse:
    """The account extension's script (public: it holds nothing but code)."""
    return web.FileResponse(
        EXTENSION_FILE,
        headers={
            hdrs.CONTENT_TYPE: "text/javascript; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def whoami(request: web.Request) -> web.Response:
    """``GET /comfygate/whoami`` (after the origin and auth guards): the caller's name and
    roles, and - for a browser session - what the sign-out form needs."""
    principal = request[CONTEXT].principal
    assert principal is not None  # the auth guard ran
    response = web.Response(content_type="application/json")
    sign_out = None
    if principal.source == "cookie":
        sign_out = request.app[LOGIN_PAGE].sign_out_form(request, response)
    response.body = orjson.dumps(
        {
            "user": principal.subject,
            "roles": sorted(principal.roles),
            "admin": principal.is_admin(request.app[SETTINGS].roles),
            "credential": principal.source,
            "sign_out": sign_out,
        }
    )
    response.headers[hdrs.CACHE_CONTROL] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def add_frontend_routes(app: web.Application, *, base_path: str) -> None:
    """Register the extension's script and ``whoami`` (before the catch-all forward route)."""
    base = base_path.rstrip("/")
    app.router.add_get(f"{base}{EXTENSION_URL}", serve_extension, name=EXTENSION_ROUTE)
    app.router.add_get(f"{base}{WHOAMI_URL}", whoami, name=WHOAMI_ROUTE)


__all__ = [
    "EXTENSION_URL",
    "WHOAMI_ROUTE",
    "WHOAMI_URL",
    "AdminStubGuard",
    "ExtensionListGuard",
    "LocalAnswer",
    "add_extension",
    "add_frontend_routes",
    "local_answers",
    "stub_answer",
]
