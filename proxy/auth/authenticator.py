"""``Authenticator``: credentials on a request -> a :class:`Principal`, or a refusal.

Sources, in order (:func:`presented_credential`): the ``Authorization`` header - ``Bearer
<jwt>``, or ``Basic`` with the API token as the password (``auth.basic_auth``; for clients that
only know HTTP Basic or ``http://user:token@host`` URLs); the identity a trusted auth proxy
forwards (``[auth.forward_auth]``, only from its address); the session cookie; a ``token`` query
parameter on the WebSocket handshake (browsers cannot set headers there) and, opt-in
(``auth.query_token_on_http``), on ComfyUI's HTTP API routes. The first source present decides:
a bad bearer token is refused even if a good cookie is also sent.

Nothing here answers ``WWW-Authenticate: Basic``: a browser would show its password prompt and
then re-send what was typed on every request by itself (the refusal's challenge is ``Bearer``).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import structlog
from aiohttp import hdrs, web

from proxy.auth.forward_auth import ForwardAuth, presents_forwarded_identity
from proxy.auth.liveness import MESSAGES, SessionLiveness
from proxy.auth.revocation import (
    FailModeRevocations,
    MemoryRevocationList,
    RedisRevocationList,
    RevocationList,
    cached,
)
from proxy.auth.sessions import InvalidSession, SessionCodec
from proxy.auth.tokens import (
    InvalidToken,
    NoKnownRole,
    TokenVerifier,
    issue_token,
)
from proxy.auth.users import UsersFile
from proxy.errors import Forbidden, Unauthenticated
from proxy.observability.metrics import METRICS
from proxy.principal import Principal, Session, Source
from proxy.redis.client import REDIS
from proxy.settings import SETTINGS
from proxy.settings.auth import SYMMETRIC, AuthSettings, JwtSettings, RoleSettings

log = structlog.get_logger("comfygate.auth")

REALM = 'Bearer realm="comfygate"'


def challenge(error_type: str, description: str) -> dict[str, str]:
    """RFC 6750 ``WWW-Authenticate`` for a refused token."""
    safe = description.replace('"', "'")
    return {hdrs.WWW_AUTHENTICATE: f'{REALM}, error="invalid_token", error_description="{safe}"'}


CredentialKind = Literal["bearer", "basic", "forward", "cookie", "query", "malformed", "none"]


@dataclass(frozen=True, slots=True)
class Credential:
    """The credential a request presents, before it is verified."""

    kind: CredentialKind
    value: str = ""
    """The token (bearer, basic, query) or the session cookie's value."""


def presented_credential(
    request: web.Request, settings: AuthSettings, *, query_token: bool
) -> Credential:
    """The credential that decides who is calling, in the authenticator's order (the module
    docstring); ``query_token``: whether a ``token`` query parameter counts on this request.

    ``malformed``: an ``Authorization`` header that is not one accepted credential (another
    scheme, an empty token, Basic when ``auth.basic_auth`` is off or undecodable, or several
    ``Authorization`` headers: which one a reader takes is not something to leave open).
    """
    authorizations = request.headers.getall(hdrs.AUTHORIZATION, ())
    if authorizations:
        if len(authorizations) > 1:
            return Credential("malformed")
        scheme, _, rest = authorizations[0].strip().partition(" ")
        rest = rest.strip()
        if scheme.lower() == "bearer" and rest:
            return Credential("bearer", rest)
        if scheme.lower() == "basic" and settings.basic_auth:
            password = basic_password(rest)
            if password:
                return Credential("basic", password)
        return Credential("malformed")
    if presents_forwarded_identity(request, settings.forward_auth):
        return Credential("forward")  # a trusted auth proxy vouches (proxy.auth.forward_auth)
    cookie = request.cookies.get(settings.session.cookie_name)
    if cookie:
        return Credential("cookie", cookie)
    if query_token:
        token = request.query.get("token")
        if token:
            return Credential("query", token)
    return Credential("none")


def basic_password(encoded: str) -> str:
    """The password of HTTP Basic credentials (RFC 7617: base64 of ``user:password``, UTF-8);
    the user name is ignored. Empty when undecodable or without a ``:``."""
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return ""
    _user, colon, password = decoded.partition(":")
    return password if colon else ""


@dataclass(slots=True)
class Authenticator:
    """Everything authentication needs, built once at startup."""

    settings: AuthSettings
    roles: Mapping[str, RoleSettings]
    verifier: TokenVerifier
    sessions: SessionCodec
    revocations: RevocationList
    users: UsersFile | None = None
    """The login page's users file: a password session lives while its user's entry is
    unchanged (None: no password login, so no password session is live)."""
    forward: ForwardAuth | None = None
    """``[auth.forward_auth]`` when enabled."""
    oidc_providers: frozenset[str] = frozenset()
    """The configured OpenID providers (a session from another one is not live)."""

    @property
    def liveness(self) -> SessionLiveness:
        """The session liveness check over this authenticator's current collaborators."""
        return SessionLiveness(self.revocations, self.users, self.sessions, self.oidc_providers)

    async def authenticate(
        self, request: web.Request, *, websocket: bool, api_route: bool = False
    ) -> tuple[Principal, Session | None]:
        """The caller's principal, and its session when it came from the cookie.

        ``websocket``: the request is a real handshake of ComfyUI's socket; ``api_route``: it is
        one of ComfyUI's HTTP API routes (where ``auth.query_token_on_http`` applies).

        Raises:
            Unauthenticated: no credentials, or invalid ones (``error_type`` says why).
            Forbidden: a valid token whose roles map to no configured role.
        """
        if not self.settings.enabled:
            role = self.settings.anonymous_role
            return Principal("anonymous", frozenset({role}), "anonymous"), None
        query_token = (websocket and self.settings.query_token_on_websocket) or (
            api_route and self.settings.query_token_on_http
        )
        credential = presented_credential(request, self.settings, query_token=query_token)
        if credential.kind == "malformed":
            expected = (
                "'Bearer <token>' or 'Basic' with the token as the password"
                if self.settings.basic_auth
                else "'Bearer <token>'"
            )
            raise Unauthenticated(
                f"Authorization must be {expected}",
                error_type="token_malformed",
                headers=challenge("token_malformed", "expected a Bearer token"),
            )
        if credential.kind == "forward":
            if self.forward is None:  # pragma: no cover - built whenever forward_auth is on
                raise Unauthenticated("forward-auth is not set up", error_type="unauthenticated")
            return await self.forward.authenticate(request), None
        if credential.kind == "cookie":
            return await self._session(credential.value)
        if credential.kind != "none":
            return await self._verify(credential.value, credential.kind), None
        raise Unauthenticated(
            "authentication required",
            error_type="unauthenticated",
            headers={hdrs.WWW_AUTHENTICATE: REALM},
        )

    async def _verify(self, token: str, source: Source) -> Principal:
        try:
            return await self.verifier.verify(token, source=source)
        except InvalidToken as exc:
            raise Unauthenticated(
                exc.message, error_type=exc.reason, headers=challenge(exc.reason, exc.message)
            ) from None
        except NoKnownRole:
            raise Forbidden(
                "the token grants no role known to this proxy", error_type="no_role"
            ) from None

    async def _session(self, cookie: str) -> tuple[Principal, Session]:
        try:
            session = self.sessions.verify(cookie)
        except InvalidSession as exc:
            raise Unauthenticated(
                "your session has ended; log in again", error_type=exc.reason
            ) from None
        ended = await self.liveness.ended(session)
        if ended is not None:
            log.info("session_refused", user=session.subject, reason=ended)
            raise Unauthenticated(MESSAGES[ended], error_type="session_revoked")
        roles = frozenset(r for r in session.roles if r in self.roles)
        if not roles:
            raise Forbidden("your roles are no longer configured", error_type="no_role")
        principal = Principal(
            subject=session.subject,
            roles=roles,
            source="cookie",
            token_id=session.session_id,
            # Idle expiry is the cookie's business; an open socket lives to the absolute limit.
            expires_at=session.absolute_expires_at,
            session=session,
        )
        return principal, session


def session_secret(settings: AuthSettings) -> bytes:
    """The configured session secret, or a random one (sessions then end with the process)."""
    if settings.session.secret:
        return settings.session.secret.encode()
    log.warning(
        "session_secret_generated",
        detail="auth.session.secret is not set: sessions end when this process stops "
        "and are not shared between replicas",
    )
    return secrets.token_bytes(32)


BOOTSTRAP_TTL_SECONDS = 24 * 3600


def jwt_settings_for_run(settings: AuthSettings) -> tuple[JwtSettings, bool]:
    """JWT settings with a random per-process secret when HS* has none configured, and whether
    this is a bootstrap run (nothing configured to log in with: no secret, no users file)."""
    jwt_settings = settings.jwt
    if not settings.enabled or set(jwt_settings.algorithms) - SYMMETRIC or jwt_settings.secret:
        return jwt_settings, False
    log.warning(
        "jwt_secret_generated",
        detail="auth.jwt.secret is not set: API tokens are signed with a random per-process "
        "secret and die with the process; `comfygate token create` needs a configured secret",
    )
    random_secret = secrets.token_urlsafe(48)
    bootstrap = not settings.login.users_file
    return jwt_settings.model_copy(update={"secret": random_secret}), bootstrap


def bootstrap_token(jwt_settings: JwtSettings, roles: Mapping[str, RoleSettings]) -> str | None:
    """A one-time admin token for a first run with nothing to log in with (None: no role is
    an admin). Shown by :func:`bootstrap_notice` once the proxy serves."""
    admin = next((name for name, role in roles.items() if role.admin), None)
    if admin is None:
        return None
    token, _ = issue_token(
        jwt_settings, subject="bootstrap-admin", roles=[admin], ttl_seconds=BOOTSTRAP_TTL_SECONDS
    )
    return token


def bootstrap_notice(token: str) -> str:
    """The console text around a bootstrap token.

    Deliberately printed on stderr and not through the log pipeline (like Jupyter's startup
    token): it is meant for the person who started the process, not for log collection.
    """
    return (
        "No users file and no JWT secret are configured. To sign in, paste this one-time\n"
        "admin token on the login page (valid 24 h, for this process only):\n\n"
        f"    {token}\n\n"
        "For real use, run `comfygate init` (a configuration with secrets and an admin user).\n"
    )


BOOTSTRAP_TOKEN = web.AppKey("comfygate.bootstrap_token", str)
"""Set by :func:`authenticator_context` on a bootstrap run; printed once the proxy listens."""


def build_revocations(app: web.Application) -> RevocationList:

    client = app[REDIS]
    if client is None:
        return MemoryRevocationList()  # a dict lookup already: nothing to cache
    ttl = app[SETTINGS].auth.revocation_cache_seconds
    failed_open = app[METRICS].redis_errors.labels(op="revocation", kind="failed_open")
    return FailModeRevocations(cached(RedisRevocationList(client), ttl), failed_open.inc)


AUTH = web.AppKey("comfygate.auth", Authenticator)
