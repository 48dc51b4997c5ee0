"""The login page: username + password (users file) or a pasted API token -> a session cookie.

Routes, under the base path (the only public routes besides the health checks):

- ``GET  /login``   the page (``login``); shows "signed in as" and a sign-out button to a
  browser that already has a live session.
- ``POST /login``   sign in (``login``): 303 to the validated ``next`` with the session cookie.
- ``GET  /logout``   a confirmation page (``logout_page``) with the sign-out button; never signs
  out by itself.
- ``POST /logout``  sign out (``logout``): revoke the session id, clear the cookie, 303 to /login.
- ``GET  /comfygate/static/...`` the page's stylesheet (``login_static``).

Security decisions, in the order a POST meets them:

1. CSRF (login CSRF too: an attacker must not sign a victim into the attacker's account):
   a double-submit token - a random value in a ``SameSite=Strict`` HttpOnly cookie and in a hidden
   field, compared in constant time - and, when the browser sends an ``Origin``, it must be ours.
   Logout accepts either the token or a same-origin ``Origin``.
2. Throttling per client IP and per username (:class:`LoginThrottle`): 429 with Retry-After.
3. One generic failure message (401) whatever went wrong, so the page is no oracle for which
   names exist or why a token was refused; the log line has the reason.
4. ``next`` is followed only when it is a same-origin path under the base path.

Nothing here logs a password, a token or a cookie.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp_jinja2
import jinja2
import redis.asyncio as redis
import structlog
from aiohttp import hdrs, web
from multidict import MultiDictProxy

from proxy.auth.liveness import SessionLiveness
from proxy.auth.sessions import InvalidSession, SessionCodec
from proxy.auth.throttle import LoginThrottle
from proxy.auth.tokens import InvalidToken, NoKnownRole
from proxy.auth.users import UserRecord, UsersFile
from proxy.errors import RateLimited, ServiceUnavailable
from proxy.json_errors import json_error
from proxy.limits.guard import limit_login
from proxy.origin import is_own_origin
from proxy.principal import Principal, Session, Source
from proxy.settings import SETTINGS, ServerSettings
from proxy.settings.auth import AuthSettings, RoleSettings
from proxy.state import CONTEXT, LIFECYCLE
from proxy.web import PACKAGE, PAGE_HEADERS, STATIC_DIR, STATIC_PREFIX, TEMPLATES, TEMPLATES_KEY

log = structlog.get_logger("comfygate.auth")

CSRF_COOKIE = "comfygate_csrf"
"""The double-submit CSRF cookie of the login page (never forwarded to ComfyUI)."""
CSRF_FIELD = "csrf"
GENERIC_FAILURE = "Invalid username, password or token."
MAX_TOKEN_LENGTH = 16 * 1024
MAX_NEXT_LENGTH = 2048
MAX_CONCURRENT_HASHES = 4
"""argon2 verifications running at once: each takes ~64 MiB and a core for tens of ms, so a
burst of logins must queue rather than exhaust memory."""

_CSRF_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


class TokenVerifying(Protocol):
    """What the login page needs of :class:`proxy.auth.tokens.TokenVerifier`."""

    async def verify(self, token: str, *, source: Source) -> Principal: ...


class SingleSignOn(Protocol):
    """What the login page needs of :class:`proxy.auth.oidc.OidcLogin`."""

    def buttons(self, next_path: str) -> list[dict[str, str]]: ...

    async def end_session_url(self, request: web.Request, session: Session) -> str | None: ...


class Revoking(Protocol):
    """What the login page needs of :class:`proxy.auth.revocation.RevocationList`."""

    async def revoke(self, token_id: str, until: float | None) -> None: ...

    async def is_revoked(self, token_id: str) -> bool: ...


@dataclass(slots=True)
class LoginPage:
    """The handlers and everything they use. Stored under :data:`LOGIN_PAGE`; its collaborators
    may be replaced during startup (before the first request), e.g. once Redis is connected."""

    base_path: str
    settings: AuthSettings
    roles: Mapping[str, RoleSettings]
    sessions: SessionCodec
    verifier: TokenVerifying
    revocations: Revoking
    throttle: LoginThrottle
    users: UsersFile | None
    cookie_secure: Callable[[web.Request], bool]
    sso: SingleSignOn | None = None
    """OpenID providers (``proxy.auth.oidc``): their buttons, and signing out there too."""
    oidc_providers: frozenset[str] = frozenset()
    _hashing: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_HASHES)
    )

    # ------------------------------------------------------------------------------ routes

    async def get_login(self, request: web.Request) -> web.Response:
        next_path = safe_next(request.query.get("next"), self.base_path)
        session = await self._live_session(request)
        return self._page(
            request, next_path=next_path, signed_in=session.subject if session else ""
        )

    async def post_login(self, request: web.Request) -> web.Response:
        form = await request.post()
        next_path = safe_next(_field(form, "next"), self.base_path)
        method: Literal["password", "token"] = "token" if "token" in form else "password"
        username = _field(form, "username").strip() if method == "password" else ""
        ip = client_ip(request)
        refused = await self._rate_limited(request, next_path, method, username)
        if refused is not None:
            return refused
        if not self._csrf_ok(request, form):
            _log_failure(username, ip, method, "csrf_failed")
            return self._page(
                request,
                status=403,
                error="Your sign-in form expired or came from another site. Please try again.",
                next_path=next_path,
                method=method,
                username=username,
            )
        try:
            wait = await self.throttle.allowed(ip, username)
            if wait > 0:
                _log_failure(username, ip, method, "throttled")
                seconds = math.ceil(wait)
                return self._page(
                    request,
                    status=429,
                    error=f"Too many failed sign-in attempts. Try again in {seconds} seconds.",
                    next_path=next_path,
                    method=method,
                    username=username,
                    headers={hdrs.RETRY_AFTER: str(seconds)},
                )
            outcome: UserRecord | Principal | str
            if method == "token":
                outcome = await self._check_token(_field(form, "token").strip())
            else:
                outcome = await self._check_password(username, _field(form, "password"))
            if isinstance(outcome, str):
                await self.throttle.failed(ip, username)
                _log_failure(username, ip, method, outcome)
                return self._page(
                    request,
                    status=401,
                    error=GENERIC_FAILURE,
                    next_path=next_path,
                    method=method,
                    username=username,
                )
            await self.throttle.succeeded(ip, username)
        except (redis.RedisError, OSError, ServiceUnavailable) as exc:
            # SECURITY: fail closed - without the throttle or the revocation list a login could
            # be brute-forced or a revoked token accepted.
            log.warning("login_unavailable", client=ip, error=type(exc).__name__)
            return self._page(
                request,
                status=503,
                error="Sign-in is temporarily unavailable. Please try again shortly.",
                next_path=next_path,
                method=method,
                username=username,
            )
        value, session = self._issue(outcome)
        log.info("login_succeeded", user=session.subject, client=ip, method=method)
        response = web.Response(status=303, headers={hdrs.LOCATION: next_path})
        self._set_session_cookie(request, response, value, session)
        _no_store(response)
        return response

    async def get_logout(self, request: web.Request) -> web.Response:
        """The sign-out confirmation: a GET can be triggered by any page, so it only asks."""
        session = await self._live_session(request)
        csrf, new = self._csrf_token(request)
        context = {
            "static_url": self._url(STATIC_PREFIX),
            "login_url": self._url("/login"),
            "logout_url": self._url("/logout"),
            "csrf": csrf,
            "home": f"{self.base_path}/",
            "signed_in": session.subject if session else "",
        }
        response = aiohttp_jinja2.render_template(
            "logout.html", request, context, app_key=TEMPLATES_KEY
        )
        if new:
            self._set_csrf_cookie(request, response, csrf)
        _no_store(response)
        response.headers.update(PAGE_HEADERS)
        return response

    def sign_out_form(self, request: web.Request, response: web.StreamResponse) -> dict[str, str]:
        """What a page of the UI needs to post the sign-out form itself (the frontend extension,
        ``proxy.frontend``): the form's URL and its CSRF value, whose cookie is set on
        ``response`` when the browser has none yet."""
        csrf, new = self._csrf_token(request)
        if new:
            self._set_csrf_cookie(request, response, csrf)
        return {"url": self._url("/logout"), "csrf": csrf}

    async def post_logout(self, request: web.Request) -> web.Response:
        form = await request.post()
        ip = client_ip(request)
        if not (self._csrf_ok(request, form) or same_origin(request)):
            log.warning("logout_refused", client=ip, reason="csrf_failed")
            return self._page(
                request,
                status=403,
                error="Sign-out refused: the request did not come from this site.",
                next_path=safe_next(None, self.base_path),
            )
        response = web.Response(status=303, headers={hdrs.LOCATION: self._url("/login")})
        _no_store(response)
        self._clear_session_cookie(request, response)
        session = self._verified_session(request)
        if session is None:
            return response
        try:
            await self.revocations.revoke(session.session_id, session.absolute_expires_at)
        except (redis.RedisError, OSError, ServiceUnavailable) as exc:
            # The cookie is cleared in this browser anyway; a copy of it would stay valid, so
            # say so instead of pretending the sign-out is complete.
            log.warning("logout_unavailable", user=session.subject, client=ip, error=str(exc))
            failed = self._page(
                request,
                status=503,
                error="Signed out in this browser, but the session could not be revoked "
                "everywhere. Please try again shortly.",
                next_path=safe_next(None, self.base_path),
            )
            self._clear_session_cookie(request, failed)
            return failed
        # This browser's open sockets end now; other replicas' at their next sweep.
        lifecycle = request.config_dict.get(LIFECYCLE)
        if lifecycle is not None:
            await lifecycle.close_relays(session.session_id, reason="signed out")
        log.info("logout", user=session.subject, client=ip)
        if session.source == "oidc" and self.sso is not None:
            # RP-initiated logout: the provider ends its own session, then sends the browser
            # back to the login page (when it offers an end_session_endpoint).
            end_session = await self.sso.end_session_url(request, session)
            if end_session is not None:
                response.headers[hdrs.LOCATION] = end_session
        return response

    async def _rate_limited(
        self,
        request: web.Request,
        next_path: str,
        method: Literal["password", "token"],
        username: str,
    ) -> web.Response | None:
        """The ``login`` rate limit (per client IP; every POST counts, whatever its outcome,
        unlike the failure throttle): 429 (the page, or JSON for an API client), 503 when it
        cannot be checked; None to go ahead."""
        try:
            await limit_login(request)
        except RateLimited as exc:
            _log_failure(username, client_ip(request), method, "rate_limited")
            if _wants_json(request):
                return json_error(
                    exc.status, exc.error_type, exc.message, headers=exc.headers, fields=exc.fields
                )
            wait = exc.retry_after
            return self._page(
                request,
                status=exc.status,
                error=f"Too many sign-in attempts. Try again in {wait} second"
                f"{'s' if wait != 1 else ''}.",
                next_path=next_path,
                method=method,
                username=username,
                headers=exc.headers,
            )
        except ServiceUnavailable as exc:
            log.warning("login_unavailable", client=client_ip(request), error=exc.error_type)
            return self._page(
                request,
                status=exc.status,
                error="Sign-in is temporarily unavailable. Please try again shortly.",
                next_path=next_path,
                method=method,
                username=username,
                headers=exc.headers,
            )
        return None

    # ------------------------------------------------------------------------- credentials

    def _issue(self, credential: UserRecord | Principal) -> tuple[str, Session]:
        """The session for a checked credential, tied to it (see :mod:`proxy.auth.liveness`):
        a user's entry by its generation, a pasted token by its ``jti`` and ``exp``."""
        if isinstance(credential, UserRecord):
            roles = tuple(r for r in credential.roles if r in self.roles)
            generation = self.sessions.user_generation(
                credential.name, credential.password_hash, credential.roles
            )
            return self.sessions.issue(
                credential.name, roles, source="password", user_generation=generation
            )
        return self.sessions.issue(
            credential.subject,
            sorted(r for r in credential.roles if r in self.roles),
            source="token",
            token_id=credential.token_id,
            # A session from a pasted token must not outlive the token.
            not_after=credential.expires_at,
        )

    async def _check_password(self, username: str, password: str) -> UserRecord | str:
        """The user's entry, or the reason for the log when refused."""
        if self.users is None:
            return "password_login_disabled"
        if not username or not password:
            return "missing_credentials"
        async with self._hashing:
            # argon2 is CPU-bound for tens of milliseconds: off the event loop.
            record = await asyncio.get_running_loop().run_in_executor(
                None, self.users.verify, username, password
            )
        if record is None:
            return "bad_credentials"
        if not any(r in self.roles for r in record.roles):
            return "no_known_role"
        return record

    async def _check_token(self, token: str) -> Principal | str:
        """The token's principal, or the reason for the log when refused."""
        if not self.settings.login.allow_token_login:
            return "token_login_disabled"
        if not token:
            return "missing_credentials"
        if len(token) > MAX_TOKEN_LENGTH:
            return "token_malformed"
        try:
            principal = await self.verifier.verify(token, source="cookie")
        except InvalidToken as exc:
            return exc.reason
        except NoKnownRole:
            return "no_known_role"
        # The verifier has checked the denylist (a revoked token never becomes a session).
        if not any(r in self.roles for r in principal.roles):
            return "no_known_role"
        if principal.expires_at is not None and principal.expires_at <= time.time():
            # Past its exp but within the verifier's leeway: the session would be born dead.
            return "token_expired"
        return principal

    # ----------------------------------------------------------------------------- session

    def _verified_session(self, request: web.Request) -> Session | None:
        value = request.cookies.get(self.settings.session.cookie_name)
        if not value:
            return None
        try:
            return self.sessions.verify(value)
        except InvalidSession:
            return None

    async def _live_session(self, request: web.Request) -> Session | None:
        """The browser's session when it is valid, live (its credential has not ended) and
        still grants a role."""
        session = self._verified_session(request)
        if session is None or not any(r in self.roles for r in session.roles):
            return None
        try:
            live = SessionLiveness(self.revocations, self.users, self.sessions, self.oidc_providers)
            if await live.ended(session):
                return None
        except (redis.RedisError, OSError, ServiceUnavailable):
            return None  # just show the sign-in form
        return session

    def _set_session_cookie(
        self, request: web.Request, response: web.StreamResponse, value: str, session: Session
    ) -> None:
        # Max-Age: the absolute limit (counted from this login, which is now); the idle limit is
        # inside the signed value and slides.
        max_age = max(0, int(session.absolute_expires_at - session.issued_at))
        response.set_cookie(
            self.settings.session.cookie_name,
            value,
            path=self._cookie_path(),
            max_age=max_age,
            httponly=True,
            samesite="Lax",  # Lax, not Strict: links to the UI from elsewhere must stay signed in
            secure=self.cookie_secure(request),
        )

    def _clear_session_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        response.set_cookie(
            self.settings.session.cookie_name,
            "",
            path=self._cookie_path(),
            max_age=0,
            expires="Thu, 01 Jan 1970 00:00:00 GMT",
            httponly=True,
            samesite="Lax",
            secure=self.cookie_secure(request),
        )

    # -------------------------------------------------------------------------------- CSRF

    def _csrf_ok(self, request: web.Request, form: MultiDictProxy[Any]) -> bool:
        """The hidden field equals the cookie (constant time) and any ``Origin`` is ours."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and origin != "null" and not same_origin(request):
            return False
        cookie = request.cookies.get(CSRF_COOKIE, "")
        submitted = _field(form, CSRF_FIELD)
        if not _CSRF_RE.fullmatch(cookie) or not _CSRF_RE.fullmatch(submitted):
            return False
        return hmac.compare_digest(cookie.encode(), submitted.encode())

    def _csrf_token(self, request: web.Request) -> tuple[str, bool]:
        """The browser's CSRF value when well-formed (so several tabs keep working), else a new
        one; and whether it is new (then the cookie must be set)."""
        current = request.cookies.get(CSRF_COOKIE, "")
        if _CSRF_RE.fullmatch(current):
            return current, False
        return secrets.token_urlsafe(32), True

    # ---------------------------------------------------------------------------- the page

    def _page(
        self,
        request: web.Request,
        *,
        status: int = 200,
        error: str = "",
        next_path: str,
        method: Literal["password", "token"] = "password",
        username: str = "",
        signed_in: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        csrf, new = self._csrf_token(request)
        context = {
            "static_url": self._url(STATIC_PREFIX),
            "login_url": self._url("/login"),
            "logout_url": self._url("/logout"),
            "csrf": csrf,
            "next": next_path,
            "error": error,
            "username": username[:64],
            "method": method,
            "password_login": self.users is not None,
            "token_login": self.settings.login.allow_token_login,
            "sso": self.sso.buttons(next_path) if self.sso is not None else [],
            "signed_in": signed_in,
        }
        response = aiohttp_jinja2.render_template(
            "login.html", request, context, status=status, app_key=TEMPLATES_KEY
        )
        if headers:
            response.headers.update(headers)
        if new:
            self._set_csrf_cookie(request, response, csrf)
        _no_store(response)
        response.headers.update(PAGE_HEADERS)
        return response

    def _set_csrf_cookie(
        self, request: web.Request, response: web.StreamResponse, csrf: str
    ) -> None:
        response.set_cookie(
            CSRF_COOKIE,
            csrf,
            path=self._cookie_path(),
            httponly=True,
            samesite="Strict",
            secure=self.cookie_secure(request),
        )

    def _url(self, path: str) -> str:
        return f"{self.base_path}{path}"

    def _cookie_path(self) -> str:
        return self.base_path or "/"


LOGIN_PAGE = web.AppKey("comfygate.login_page", LoginPage)


def add_login_routes(app: web.Application, *, base_path: str, settings: AuthSettings) -> None:
    """Register the login routes (``login``, ``logout``, ``login_static``) under ``base_path``.

    Call in ``create_app``, before the catch-all forward route (routes match in registration
    order). The handlers find their :class:`LoginPage` under :data:`LOGIN_PAGE`, which
    :func:`build_login_page` sets at startup, once Redis and the authenticator exist.
    """
    base = base_path.rstrip("/")
    loader: jinja2.BaseLoader = jinja2.PackageLoader(PACKAGE, TEMPLATES)
    if settings.login.templates_dir:
        # The operator's templates first; base.html and anything not overridden stay built in.
        loader = jinja2.ChoiceLoader(
            [jinja2.FileSystemLoader(settings.login.templates_dir), loader]
        )
    aiohttp_jinja2.setup(
        app, loader=loader, autoescape=True, default_helpers=False, app_key=TEMPLATES_KEY
    )
    login = app.router.add_resource(f"{base}/login", name="login")
    login.add_route("GET", _handler(LoginPage.get_login))
    login.add_route("POST", _handler(LoginPage.post_login))
    logout = app.router.add_resource(f"{base}/logout", name="logout")
    logout.add_route("GET", _handler(LoginPage.get_logout))
    logout.add_route("POST", _handler(LoginPage.post_logout))
    app.router.add_static(f"{base}{STATIC_PREFIX}", STATIC_DIR, name="login_static")


def setup_login(
    app: web.Application,
    *,
    base_path: str,
    settings: AuthSettings,
    roles: Mapping[str, RoleSettings],
    sessions: SessionCodec,
    verifier: TokenVerifying,
    revocations: Revoking,
    throttle: LoginThrottle,
    users: UsersFile | None,
    cookie_secure: Callable[[web.Request], bool],
) -> None:
    """Routes and page at once, for an app whose collaborators exist before it starts (tests)."""
    add_login_routes(app, base_path=base_path, settings=settings)
    app[LOGIN_PAGE] = LoginPage(
        base_path=base_path.rstrip("/"),
        settings=settings,
        roles=roles,
        sessions=sessions,
        verifier=verifier,
        revocations=revocations,
        throttle=throttle,
        users=users,
        cookie_secure=cookie_secure,
    )


def _handler(
    method: Callable[[LoginPage, web.Request], Any],
) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse = await method(request.config_dict[LOGIN_PAGE], request)
        return response

    return handle


# ---------------------------------------------------------------------------------- helpers


def safe_next(value: str | None, base_path: str) -> str:
    """Where to go after signing in: ``value`` when it is a same-origin path under the base
    path, else the base path's root.

    Refused: anything not starting with exactly one ``/`` (``//evil`` and ``https://evil`` are
    other origins), any backslash (browsers read ``/\\evil`` as ``//evil``), and any control
    character, space or non-ASCII (browsers strip tabs and newlines: ``/\\t/evil``).
    """
    default = f"{base_path}/"
    if not value or len(value) > MAX_NEXT_LENGTH:
        return default
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        return default
    if base_path and not (
        value == base_path or value.startswith((f"{base_path}/", f"{base_path}?"))
    ):
        return default
    return value


def same_origin(request: web.Request) -> bool:
    """Whether the request's ``Origin`` is the proxy's own (the host the browser used, or
    ``server.public_url``). False without an ``Origin``."""
    origin = request.headers.get(hdrs.ORIGIN)
    if not origin or origin == "null":
        return False
    settings = request.config_dict.get(SETTINGS)
    server = settings.server if settings is not None else ServerSettings()
    return is_own_origin(origin, request, server)


def client_ip(request: web.Request) -> str:
    """The client address ``observe`` resolved (trusted proxies applied), else the peer."""
    if CONTEXT in request and request[CONTEXT].client_ip:
        return request[CONTEXT].client_ip
    return request.remote or ""


def _field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""  # a file upload is not a credential


def _wants_json(request: web.Request) -> bool:
    """An API client posting to the login form (JSON body, or asks for JSON and not HTML)."""
    accept = request.headers.get(hdrs.ACCEPT, "")
    return request.content_type == "application/json" or (
        "application/json" in accept and "text/html" not in accept
    )


def _no_store(response: web.StreamResponse) -> None:
    response.headers[hdrs.CACHE_CONTROL] = "no-store"


def _log_failure(username: str, ip: str, method: str, reason: str) -> None:
    # The typed name is attacker-controlled: bounded, and JSON logging escapes it.
    log.info("login_failed", user=username[:64] or None, client=ip, method=method, reason=reason)


__all__ = [
    "CSRF_COOKIE",
    "GENERIC_FAILURE",
    "LOGIN_PAGE",
    "LoginPage",
    "Revoking",
    "TokenVerifying",
    "add_login_routes",
    "client_ip",
    "safe_next",
    "same_origin",
    "setup_login",
]
