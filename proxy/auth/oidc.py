"""Sign in with an OpenID provider: the authorization-code flow with PKCE, ``state`` and
``nonce`` (OpenID Connect Core 1.0, RFC 7636), ending in the same session cookie as the login
page's password form.

Routes, under the base path, next to ``/login`` (public, like it):

- ``GET /login/oidc/<provider>?next=...`` (``oidc_start``): 302 to the provider's
  authorization endpoint, with a short-lived flow cookie.
- ``GET /login/oidc/<provider>/callback`` (``oidc_callback``): the redirect URI to register at
  the provider. Checks the flow, exchanges the code, verifies the ID token, maps the roles, and
  303s to ``next`` with the session cookie.

Where the flow's secrets live: nowhere. ``state`` is random; the PKCE verifier and the
``nonce`` are HMACs of it under a key derived from the session secret, so the proxy recomputes
them at the callback and no replica needs to remember them. The flow cookie (HttpOnly,
SameSite=Lax - the callback is a cross-site top-level GET - scoped to ``/login/oidc/``) carries
``state``, the provider and ``next``, signed (HS256, its own ``typ``) and expiring after
``auth.oidc.flow_timeout_seconds``. It binds the callback to the browser that started the
flow: a callback URL sent to another browser (login CSRF, a leaked code) has no cookie to match.
Each ``state`` is used once (Redis ``SET NX`` when configured, else this process's memory): a
replayed callback is refused before the code is sent anywhere.

The ID token (from the token endpoint, over TLS, never from the browser) is verified with the
provider's JWKS: an algorithm of the provider's pinned list, ``iss`` equal to the discovered
issuer, ``aud`` naming the client (and ``azp`` when several), ``exp``/``iat`` with leeway, and
``nonce`` equal to the flow's. The person is ``<sub>@<iss>`` - the provider's stable subject,
never the e-mail address, which can change or be reassigned - so ``Comfy-User`` and the
per-user folders follow the account, not its address.

Every refusal renders the login page with a sentence for the person (never a 500), logs one
``oidc_login_failed`` line with the reason, and counts it in ``comfygate_auth_failures``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt
import orjson
import redis.asyncio as redis
import structlog
from aiohttp import hdrs, web
from yarl import URL

from proxy.auth.forward_auth import claim_at, role_names
from proxy.auth.keys import JwksKeys, key_fits
from proxy.auth.login import LOGIN_PAGE, LoginPage, client_ip, safe_next
from proxy.auth.tokens import check_signature
from proxy.errors import RateLimited, ServiceUnavailable
from proxy.limits.guard import limit_login
from proxy.observability.metrics import METRICS
from proxy.origin import browser_origin
from proxy.settings import SETTINGS
from proxy.settings.auth import RoleSettings
from proxy.settings.sso import LOOPBACK_HOSTS, OidcProviderSettings, OidcSettings

if TYPE_CHECKING:
    from proxy.principal import Session
    from proxy.redis.client import RedisClient

log = structlog.get_logger("comfygate.auth.oidc")

FLOW_COOKIE = "comfygate_oidc"
"""The flow cookie (never forwarded to ComfyUI; its path is the proxy's own routes anyway)."""
FLOW_TYPE = "comfygate-oidc-flow"
FLOW_KEY_PREFIX = "comfygate:oidc:flow:"
MAX_RESPONSE_BYTES = 1 << 20
MAX_PARAM_LENGTH = 4096
MAX_SUBJECT_LENGTH = 255
START_ROUTE = "oidc_start"
CALLBACK_ROUTE = "oidc_callback"

# What the person reads, per kind of refusal (the log line has the precise reason).
RETRY = "Your sign-in could not be completed (it expired, or was started in another browser "
RETRY += "or tab). Please try again."
NOT_VERIFIED = "The sign-in could not be verified with the identity provider. Please try again."
NOT_ALLOWED = "Your account is not allowed to use this ComfyUI. Ask its administrator."
UNAVAILABLE = "{label} cannot be reached right now. Please try again shortly."
NO_SUCH_PROVIDER = "There is no such sign-in option on this server."


class ProviderUnavailable(Exception):
    """The provider did not answer usably (down, timeout, 5xx, garbage)."""


class LoginRefused(Exception):
    """The sign-in is refused: ``reason`` for the log and metric, ``status`` and ``message``
    for the page."""

    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Discovery:
    """What the proxy uses of a provider's ``.well-known/openid-configuration``."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    roles: frozenset[str]
    email: str | None


def _endpoint(document: Mapping[str, Any], key: str) -> str | None:
    """An endpoint URL of the discovery document: https (or http on loopback), else None."""
    value = document.get(key)
    if not isinstance(value, str):
        return None
    try:
        url = URL(value)
    except ValueError:
        return None
    if url.scheme == "https" and url.host:
        return value
    return value if url.scheme == "http" and url.host in LOOPBACK_HOSTS else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class OidcProvider:
    """One configured provider: discovery, code exchange, ID token verification, identity."""

    def __init__(
        self,
        name: str,
        settings: OidcProviderSettings,
        roles: Mapping[str, RoleSettings],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.settings = settings
        self.label = settings.label or f"Sign in with {name}"
        self._roles = roles
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._discovery: Discovery | None = None
        self._fetched_at = 0.0
        self._jwks: JwksKeys | None = None
        self._lock = asyncio.Lock()

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Discover now so a misconfiguration shows in the startup log; a provider that is down
        is not fatal (the login page says so, and the next sign-in tries again)."""
        self._session = session
        try:
            await self.discovery()
        except ProviderUnavailable as exc:
            log.warning("oidc_discovery_failed", provider=self.name, error=str(exc))

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    async def discovery(self) -> Discovery:
        """The provider's metadata, cached ``discovery_max_age_seconds``.

        Raises:
            ProviderUnavailable: not fetched, or not acceptable.
        """
        now = time.monotonic()
        current = self._discovery
        if current is not None and now - self._fetched_at < self.settings.discovery_max_age_seconds:
            return current
        async with self._lock:
            if self._discovery is not None and self._discovery is not current:
                return self._discovery  # fetched while this request waited
            try:
                found = await self._discover()
            except ProviderUnavailable:
                if current is not None:
                    return current  # keep the last good metadata while the provider is down
                raise
            if self._jwks is None or self._jwks.url != found.jwks_uri:
                if self._jwks is not None:
                    await self._jwks.close()
                self._jwks = JwksKeys(found.jwks_uri, session=self._session)
                await self._jwks.start()
            self._discovery, self._fetched_at = found, now
            return found

    async def _discover(self) -> Discovery:
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json(url)
        issuer = document.get("issuer")
        # SECURITY: the metadata must be the configured issuer's own (OpenID Discovery 4.3);
        # its exact spelling is what ID tokens are then compared with.
        if not isinstance(issuer, str) or issuer.rstrip("/") != self.settings.issuer.rstrip("/"):
            raise ProviderUnavailable(f"discovery names another issuer ({str(issuer)[:200]!r})")
        authorization = _endpoint(document, "authorization_endpoint")
        token = _endpoint(document, "token_endpoint")
        jwks = _endpoint(document, "jwks_uri")
        if authorization is None or token is None or jwks is None:
            raise ProviderUnavailable("discovery lacks an authorization, token or JWKS endpoint")
        return Discovery(
            issuer, authorization, token, jwks, _endpoint(document, "end_session_endpoint")
        )

    async def _get_json(self, url: str) -> dict[str, Any]:
        return await self._request("GET", url)

    async def _request(
        self,
        method: str,
        url: str,
        *,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        refused_statuses: frozenset[int] = frozenset(),
    ) -> dict[str, Any]:
        if self._session is None:
            raise ProviderUnavailable("not started")
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                headers={hdrs.ACCEPT: "application/json", **(headers or {})},
                timeout=aiohttp.ClientTimeout(total=self.settings.http_timeout_seconds),
                allow_redirects=False,
            ) as resp:
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ProviderUnavailable(type(exc).__name__) from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise ProviderUnavailable("answer too large")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        if status in refused_statuses and isinstance(document, dict):
            error = document.get("error")
            raise LoginRefused(
                f"token_refused:{str(error)[:40]}" if isinstance(error, str) else "token_refused",
                401,
                "The identity provider refused to complete the sign-in. Please try again.",
            )
        if status != 200:
            raise ProviderUnavailable(f"HTTP {status}")
        if not isinstance(document, dict):
            raise ProviderUnavailable("answer is not a JSON object")
        return document

    async def exchange(self, code: str, redirect_uri: str, verifier: str) -> str:
        """The ID token for an authorization code.

        Raises:
            ProviderUnavailable: the token endpoint did not answer usably.
            LoginRefused: it refused the code (used, expired, or not this flow's).
        """
        discovery = await self.discovery()
        s = self.settings
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        headers: dict[str, str] = {}
        if s.token_auth_method == "client_secret_basic":  # noqa: S105 - a method's name
            # RFC 6749 2.3.1: each part form-urlencoded before the Basic encoding.
            user = URL.build(query={"u": s.client_id}).query_string[2:]
            password = URL.build(query={"p": s.client_secret}).query_string[2:]
            pair = f"{user}:{password}".encode()
            headers[hdrs.AUTHORIZATION] = "Basic " + base64.b64encode(pair).decode()
        else:
            form["client_id"] = s.client_id
            if s.token_auth_method == "client_secret_post":  # noqa: S105 - a method's name
                form["client_secret"] = s.client_secret
        answer = await self._request(
            "POST",
            discovery.token_endpoint,
            data=form,
            headers=headers,
            refused_statuses=frozenset({400, 401}),
        )
        id_token = answer.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise LoginRefused("no_id_token", 502, NOT_VERIFIED)
        return id_token

    async def verify_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once every check passed (module docstring).

        Raises:
            LoginRefused: any check failed (``reason`` says which).
        """
        discovery = await self.discovery()
        s = self.settings
        if len(id_token) > 64 * 1024:
            raise LoginRefused("id_token_malformed", 401, NOT_VERIFIED)
        try:
            header = jwt.get_unverified_header(id_token)
        except (jwt.PyJWTError, RecursionError):
            raise LoginRefused("id_token_malformed", 401, NOT_VERIFIED) from None
        algorithm, kid = header.get("alg"), header.get("kid")
        # SECURITY: only the pinned (asymmetric) algorithms; the header's alg chooses nothing.
        if algorithm not in s.algorithms or not (kid is None or isinstance(kid, str)):
            raise LoginRefused("id_token_alg_not_allowed", 401, NOT_VERIFIED)
        assert self._jwks is not None  # set by discovery()
        claims: dict[str, Any] | None = None
        for key in await self._jwks.candidates(algorithm, kid):
            if not key_fits(algorithm, key):
                continue
            try:
                decoded = check_signature(id_token, key, algorithm)
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, RecursionError):
                break
            claims = decoded if isinstance(decoded, dict) else None
            break
        if claims is None:
            raise LoginRefused("id_token_bad_signature", 401, NOT_VERIFIED)
        if claims.get("iss") != discovery.issuer:
            raise LoginRefused("id_token_wrong_issuer", 401, NOT_VERIFIED)
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if s.client_id not in audiences:
            raise LoginRefused("id_token_wrong_audience", 401, NOT_VERIFIED)
        if len(audiences) > 1 and claims.get("azp") != s.client_id:
            raise LoginRefused("id_token_wrong_audience", 401, NOT_VERIFIED)
        now = self._clock()
        exp, iat = _number(claims.get("exp")), _number(claims.get("iat"))
        if exp is None or iat is None:
            raise LoginRefused("id_token_missing_claim", 401, NOT_VERIFIED)
        if now >= exp + s.leeway_seconds:
            raise LoginRefused("id_token_expired", 401, NOT_VERIFIED)
        if iat > now + s.leeway_seconds:
            raise LoginRefused("id_token_not_yet_valid", 401, NOT_VERIFIED)
        token_nonce = claims.get("nonce")
        # SECURITY: the nonce ties the token to this browser's flow (an ID token obtained in
        # another flow - an injected code - carries another nonce).
        if not isinstance(token_nonce, str) or not hmac.compare_digest(
            token_nonce.encode(), nonce.encode()
        ):
            raise LoginRefused("nonce_mismatch", 401, NOT_VERIFIED)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT_LENGTH:
            raise LoginRefused("id_token_no_subject", 401, NOT_VERIFIED)
        return claims

    def identity(self, claims: Mapping[str, Any]) -> Identity:
        """Who signed in, with which roles.

        Raises:
            LoginRefused: outside the allowed groups or e-mail domains, or no role.
        """
        s = self.settings
        subject = f"{claims['sub']}@{claims['iss']}"
        email = claims.get("email") if isinstance(claims.get("email"), str) else None
        if s.allowed_groups:
            groups = set(role_names(claim_at(claims, s.groups_claim or s.roles_claim)))
            if not groups & set(s.allowed_groups):
                raise LoginRefused("not_in_allowed_groups", 403, NOT_ALLOWED)
        if s.allowed_email_domains:
            domain = email.rpartition("@")[2].lower() if email and "@" in email else ""
            if domain not in s.allowed_email_domains:
                raise LoginRefused("email_domain_not_allowed", 403, NOT_ALLOWED)
            if s.require_verified_email and claims.get("email_verified") is not True:
                raise LoginRefused("email_not_verified", 403, NOT_ALLOWED)
        mapped = {s.role_map.get(n, n) for n in role_names(claim_at(claims, s.roles_claim))}
        roles = frozenset(r for r in mapped if r in self._roles)
        if not roles and s.default_role in self._roles:
            roles = frozenset({s.default_role})
        if not roles:
            raise LoginRefused("no_role", 403, NOT_ALLOWED)
        return Identity(subject, roles, email)

    async def end_session_url(self, post_logout_redirect_uri: str) -> str | None:
        """Where to send the browser to sign out at the provider too (RP-Initiated Logout 1.0,
        with ``client_id`` since the ID token is not kept), or None."""
        if not self.settings.rp_initiated_logout:
            return None
        try:
            discovery = await self.discovery()
        except ProviderUnavailable:
            return None
        if discovery.end_session_endpoint is None:
            return None
        query = {"client_id": self.settings.client_id}
        query["post_logout_redirect_uri"] = post_logout_redirect_uri
        return str(URL(discovery.end_session_endpoint).update_query(query))


class FlowStore:
    """Single use of each flow's ``state``: Redis ``SET NX`` (all replicas), else memory."""

    def __init__(self, client: RedisClient | None) -> None:
        self._redis = client
        self._used: dict[str, float] = {}

    async def claim(self, state: str, ttl: float) -> bool:
        """True the first time ``state`` is claimed within ``ttl`` seconds.

        Raises:
            redis.RedisError, OSError: Redis is failing (the caller fails closed).
        """
        key = FLOW_KEY_PREFIX + hashlib.sha256(state.encode()).hexdigest()
        if self._redis is not None:
            return bool(await self._redis.set(key, "1", nx=True, ex=max(1, math.ceil(ttl))))
        now = time.monotonic()
        if len(self._used) > 1000:
            self._used = {k: t for k, t in self._used.items() if t > now}
        if self._used.get(key, 0.0) > now:
            return False
        self._used[key] = now + ttl
        return True


@dataclass(frozen=True, slots=True)
class Flow:
    state: str
    provider: str
    next_path: str


class OidcLogin:
    """The two routes' handlers and the login page's buttons and logout hook."""

    def __init__(
        self,
        settings: OidcSettings,
        roles: Mapping[str, RoleSettings],
        *,
        base_path: str,
        secret: bytes,
        store: FlowStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.base_path = base_path.rstrip("/")
        self.providers = {
            name: OidcProvider(name, p, roles, clock=clock)
            for name, p in settings.providers.items()
        }
        # Its own key: a flow cookie is never a session, and a PKCE verifier or nonce computed
        # from it says nothing about the session secret.
        self._key = hmac.new(secret, b"comfygate-oidc-flow", hashlib.sha256).digest()
        self._store = store
        self._clock = clock
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        for provider in self.providers.values():
            await provider.start(self._http)

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
        if self._http is not None:
            await self._http.close()

    # ------------------------------------------------------------------ the login page's hooks

    def buttons(self, next_path: str) -> list[dict[str, str]]:
        """One "Sign in with ..." link per provider, carrying ``next``."""
        return [
            {
                "label": p.label,
                "url": str(URL(f"{self.base_path}/login/oidc/{name}").with_query(next=next_path)),
            }
            for name, p in self.providers.items()
        ]

    async def end_session_url(self, request: web.Request, session: Session) -> str | None:
        provider = self.providers.get(session.provider or "")
        if provider is None:
            return None
        return await provider.end_session_url(self._public(request, "/login"))

    # ---------------------------------------------------------------------------- the routes

    async def start_flow(self, request: web.Request) -> web.StreamResponse:
        page = request.config_dict[LOGIN_PAGE]
        next_path = safe_next(request.query.get("next"), self.base_path)
        name = request.match_info["provider"]
        provider = await self._admit(request, page, next_path, name)
        if isinstance(provider, web.Response):
            return provider
        try:
            discovery = await provider.discovery()
        except ProviderUnavailable as exc:
            return self._unavailable(request, page, next_path, provider, str(exc))
        state = secrets.token_urlsafe(32)
        params = {
            **provider.settings.extra_auth_params,
            "response_type": "code",
            "client_id": provider.settings.client_id,
            "redirect_uri": self._redirect_uri(request, name),
            "scope": " ".join(provider.settings.scopes),
            "state": state,
            "nonce": self._derive("nonce", state),
            "code_challenge": _b64(hashlib.sha256(self._derive("pkce", state).encode()).digest()),
            "code_challenge_method": "S256",
        }
        location = str(URL(discovery.authorization_endpoint).update_query(params))
        response = web.Response(status=302, headers={hdrs.LOCATION: location})
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
        self._set_flow_cookie(request, response, Flow(state, name, next_path), page)
        log.info("oidc_login_started", provider=name, client=client_ip(request))
        return response

    async def callback(self, request: web.Request) -> web.StreamResponse:
        page = request.config_dict[LOGIN_PAGE]
        name = request.match_info["provider"]
        flow = self._read_flow(request)
        next_path = flow.next_path if flow is not None else safe_next(None, self.base_path)
        provider = await self._admit(request, page, next_path, name)
        if isinstance(provider, web.Response):
            return provider
        try:
            flow, code = await self._checked_callback(request, name, provider, flow)
            id_token = await provider.exchange(
                code, self._redirect_uri(request, name), self._derive("pkce", flow.state)
            )
            claims = await provider.verify_id_token(id_token, self._derive("nonce", flow.state))
            identity = provider.identity(claims)
        except ProviderUnavailable as exc:
            return self._unavailable(request, page, next_path, provider, str(exc))
        except LoginRefused as exc:
            return self._refuse(request, page, next_path, name, exc)
        now = self._clock()
        limit = provider.settings.max_session_seconds
        value, session = page.sessions.issue(
            identity.subject,
            sorted(identity.roles),
            source="oidc",
            provider=name,
            not_after=now + limit if limit > 0 else None,
        )
        log.info(
            "login_succeeded",
            user=session.subject,
            client=client_ip(request),
            method="oidc",
            provider=name,
            roles=sorted(identity.roles),
        )
        response = web.Response(status=303, headers={hdrs.LOCATION: flow.next_path})
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
        page._set_session_cookie(request, response, value, session)
        self._clear_flow_cookie(request, response, page)
        return response

    # --------------------------------------------------------------------------- helpers

    async def _checked_callback(
        self, request: web.Request, name: str, provider: OidcProvider, flow: Flow | None
    ) -> tuple[Flow, str]:
        """The callback's own checks, in order: the provider's error, this browser's flow and
        its state, the code, then the state's single use. Returns the flow and the code.

        Raises:
            LoginRefused: the first check that fails.
        """
        error = request.query.get("error")
        if error is not None:
            # The person cancelled, or the provider refused them (access_denied, ...).
            reason = "provider_error:" + "".join(c for c in error[:40] if c.isalnum() or c == "_")
            raise LoginRefused(
                reason, 401, f"{provider.label} did not sign you in. Please try again."
            )
        if flow is None:
            raise LoginRefused("flow_missing", 400, RETRY)
        state = request.query.get("state", "")
        if flow.provider != name:
            raise LoginRefused("provider_mismatch", 400, RETRY)
        # SECURITY: the state in the URL must be the one this browser's flow cookie holds.
        if not hmac.compare_digest(state.encode(), flow.state.encode()):
            raise LoginRefused("state_mismatch", 400, RETRY)
        code = request.query.get("code", "")
        if not code or len(code) > MAX_PARAM_LENGTH:
            raise LoginRefused("code_missing", 400, RETRY)
        try:
            first = await self._store.claim(flow.state, self.settings.flow_timeout_seconds)
        except (redis.RedisError, OSError) as exc:
            log.warning("oidc_login_unavailable", provider=name, error=type(exc).__name__)
            raise LoginRefused(
                "store_unavailable",
                503,
                "Sign-in is temporarily unavailable. Please try again shortly.",
            ) from None
        if not first:
            raise LoginRefused("flow_replayed", 400, RETRY)
        return flow, code

    def _derive(self, purpose: str, state: str) -> str:
        """The flow's PKCE verifier or nonce (43 characters of base64url: RFC 7636 4.1)."""
        return _b64(hmac.new(self._key, f"{purpose}\0{state}".encode(), hashlib.sha256).digest())

    def _public(self, request: web.Request, path: str) -> str:
        """An absolute URL of ours: ``server.public_url`` when set, else the origin the browser
        used (trusted proxies applied). The provider only redirects to registered URLs, so a
        forged ``Host`` yields a refused request, not a redirect elsewhere."""
        server = request.app[SETTINGS].server
        if server.public_url:
            origin = server.public_url.rstrip("/")
        else:
            scheme, host = browser_origin(request, server)
            origin = f"{scheme}://{host}"
        return f"{origin}{self.base_path}{path}"

    def _redirect_uri(self, request: web.Request, name: str) -> str:
        return self._public(request, f"/login/oidc/{name}/callback")

    def _cookie_path(self) -> str:
        return f"{self.base_path}/login/oidc/"

    def _set_flow_cookie(
        self, request: web.Request, response: web.StreamResponse, flow: Flow, page: LoginPage
    ) -> None:
        ttl = self.settings.flow_timeout_seconds
        claims = {
            "typ": FLOW_TYPE,
            "st": flow.state,
            "prov": flow.provider,
            "next": flow.next_path,
            "exp": int(self._clock() + ttl),
        }
        response.set_cookie(
            FLOW_COOKIE,
            jwt.encode(claims, self._key, algorithm="HS256"),
            path=self._cookie_path(),
            max_age=int(ttl),
            httponly=True,
            # Lax: the provider's redirect back is a cross-site top-level GET, which Strict
            # would send without the cookie.
            samesite="Lax",
            secure=page.cookie_secure(request),
        )

    def _clear_flow_cookie(
        self, request: web.Request, response: web.StreamResponse, page: LoginPage
    ) -> None:
        response.set_cookie(
            FLOW_COOKIE,
            "",
            path=self._cookie_path(),
            max_age=0,
            expires="Thu, 01 Jan 1970 00:00:00 GMT",
            httponly=True,
            samesite="Lax",
            secure=page.cookie_secure(request),
        )

    def _read_flow(self, request: web.Request) -> Flow | None:
        value = request.cookies.get(FLOW_COOKIE)
        if not value or len(value) > MAX_PARAM_LENGTH:
            return None
        try:
            claims = jwt.decode(
                value,
                self._key,
                algorithms=["HS256"],
                options={"require": ["exp", "typ", "st", "prov", "next"], "verify_exp": False},
            )
        except jwt.PyJWTError:
            return None
        exp = _number(claims.get("exp"))
        if claims.get("typ") != FLOW_TYPE or exp is None or exp <= self._clock():
            return None
        state, provider, next_path = claims["st"], claims["prov"], claims["next"]
        if not all(isinstance(v, str) for v in (state, provider, next_path)):
            return None
        return Flow(state, provider, safe_next(next_path, self.base_path))

    async def _admit(
        self, request: web.Request, page: LoginPage, next_path: str, name: str
    ) -> OidcProvider | web.Response:
        """Both routes' first steps: the login rate limit, then the provider named in the path
        (an unknown one is a 404 page, never a redirect anywhere)."""
        refused = await self._rate_limited(request, page, next_path, name)
        if refused is not None:
            return refused
        provider = self.providers.get(name)
        if provider is None:
            unknown = LoginRefused("unknown_provider", 404, NO_SUCH_PROVIDER)
            return self._refuse(request, page, next_path, name, unknown)
        return provider

    async def _rate_limited(
        self, request: web.Request, page: LoginPage, next_path: str, name: str
    ) -> web.Response | None:
        try:
            await limit_login(request)
        except RateLimited as exc:
            return self._refuse(
                request,
                page,
                next_path,
                name,
                LoginRefused(
                    "rate_limited", exc.status, "Too many sign-in attempts. Please wait a moment."
                ),
                headers=exc.headers,
            )
        except ServiceUnavailable as exc:
            return self._refuse(
                request,
                page,
                next_path,
                name,
                LoginRefused(
                    "rate_limit_unavailable", exc.status, "Sign-in is temporarily unavailable."
                ),
                headers=exc.headers,
            )
        return None

    def _unavailable(
        self,
        request: web.Request,
        page: LoginPage,
        next_path: str,
        provider: OidcProvider,
        detail: str,
    ) -> web.Response:
        log.warning("oidc_provider_unavailable", provider=provider.name, error=detail)
        message = UNAVAILABLE.format(label=provider.label.removeprefix("Sign in with "))
        return self._refuse(
            request,
            page,
            next_path,
            provider.name,
            LoginRefused("provider_unavailable", 503, message),
            headers={hdrs.RETRY_AFTER: "10"},
        )

    def _refuse(
        self,
        request: web.Request,
        page: LoginPage,
        next_path: str,
        provider: str,
        refusal: LoginRefused,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        """The login page with the refusal's message (and every provider's button to try
        again); one log line and one count of the reason."""
        reason, status = refusal.reason, refusal.status
        log.info(
            "oidc_login_failed",
            provider=provider[:40],
            reason=reason,
            status=status,
            client=client_ip(request),
        )
        metrics = request.config_dict.get(METRICS)
        if metrics is not None:
            metrics.auth_failures.labels(f"oidc_{reason.partition(':')[0]}").inc()
        response = page._page(
            request, status=status, error=refusal.message, next_path=next_path, headers=headers
        )
        if request.match_info.route.name == CALLBACK_ROUTE:
            self._clear_flow_cookie(request, response, page)
        return response


OIDC_LOGIN = web.AppKey("comfygate.oidc_login", OidcLogin)


def add_oidc_routes(app: web.Application, *, base_path: str) -> None:
    """``GET /login/oidc/{provider}`` and ``.../callback`` under ``base_path`` (before the
    catch-all forward route). Handlers find :class:`OidcLogin` under :data:`OIDC_LOGIN`,
    which the authenticator's startup sets when providers are configured."""
    base = base_path.rstrip("/")

    async def start(request: web.Request) -> web.StreamResponse:
        login = request.config_dict.get(OIDC_LOGIN)
        return await login.start_flow(request) if login else _not_configured(request)

    async def callback(request: web.Request) -> web.StreamResponse:
        login = request.config_dict.get(OIDC_LOGIN)
        return await login.callback(request) if login else _not_configured(request)

    app.router.add_get(f"{base}/login/oidc/{{provider}}", start, name=START_ROUTE, allow_head=False)
    app.router.add_get(
        f"{base}/login/oidc/{{provider}}/callback", callback, name=CALLBACK_ROUTE, allow_head=False
    )


def _not_configured(request: web.Request) -> web.StreamResponse:
    """No provider configured: the same "no such option" page as an unknown name."""
    log.info("oidc_login_failed", reason="unknown_provider", client=client_ip(request))
    return request.config_dict[LOGIN_PAGE]._page(
        request, status=404, error=NO_SUCH_PROVIDER, next_path=safe_next(None, "")
    )


def build_oidc_login(
    settings: OidcSettings,
    roles: Mapping[str, RoleSettings],
    *,
    base_path: str,
    secret: bytes,
    client: RedisClient | None,
) -> OidcLogin | None:
    """The OIDC login when providers are configured (start and close it with the app)."""
    if not settings.providers:
        return None
    return OidcLogin(settings, roles, base_path=base_path, secret=secret, store=FlowStore(client))


__all__ = [
    "CALLBACK_ROUTE",
    "FLOW_COOKIE",
    "OIDC_LOGIN",
    "START_ROUTE",
    "FlowStore",
    "LoginRefused",
    "OidcLogin",
    "OidcProvider",
    "ProviderUnavailable",
    "add_oidc_routes",
    "build_oidc_login",
]
