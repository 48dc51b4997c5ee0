"""Configuration sections of the identity layer: ``[auth]``, ``[auth.jwt]``, ``[auth.session]``,
``[auth.login]`` and ``[roles.<name>]``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

from proxy.settings.limits import ROUTE_CLASSES, UNLIMITED_LIMIT, Limit, RouteClass
from proxy.settings.sso import ForwardAuthSettings, OidcSettings, sso_role_problems

ALGORITHMS = frozenset(
    {
        "HS256", "HS384", "HS512",
        "RS256", "RS384", "RS512",
        "PS256", "PS384", "PS512",
        "ES256", "ES384", "ES512",
        "EdDSA",
    }
)  # fmt: skip
SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})
SESSION_SECRET_MIN_BYTES = 32


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JwtSettings(_Section):
    """Verification of bearer tokens (and of tokens pasted on the login page)."""

    algorithms: tuple[str, ...] = ("HS256",)
    """Accepted ``alg`` values; a token's own ``alg`` is never trusted beyond this list."""
    secret: str = ""
    """Shared secret for HS* (use ``secret_file`` or ``COMFYGATE_AUTH__JWT__SECRET``). Empty with
    HS* algorithms: a random per-process secret (tokens die with the process; a warning says so)."""
    public_keys: tuple[str, ...] = ()
    """PEM public keys (RS/PS/ES/EdDSA); a value may also be a path to a PEM file."""
    private_key: str = ""
    """PEM private key (or path), used only by ``comfygate token create`` (asymmetric algs)."""
    jwks_url: str = ""
    """An identity provider's JWKS endpoint: fetched at startup, cached, refetched on new kid."""
    jwks_max_age_seconds: float = Field(default=600.0, gt=0)
    """How long a fetched JWKS is used before it is fetched again."""
    jwks_refetch_cooldown_seconds: float = Field(default=30.0, ge=0)
    """Shortest pause between two refetches caused by unknown ``kid`` values."""
    issuer: str = ""
    """Required ``iss`` value; empty = not checked."""
    audience: tuple[str, ...] = ()
    """Accepted ``aud`` values; empty = ``aud`` not checked."""
    leeway_seconds: float = Field(default=30.0, ge=0)
    """Clock skew tolerated when checking ``exp``, ``nbf`` and ``iat``."""
    require_exp: bool = True
    """Refuse tokens without an ``exp`` claim."""
    max_lifetime_seconds: float = Field(default=0.0, ge=0)
    """Refuse tokens whose ``exp - iat`` exceeds this (0 = no limit)."""
    subject_claim: str = "sub"
    """The claim naming the principal (its stable user id)."""
    roles_claim: str = "roles"
    """Dotted path to the roles (a list or a space/comma separated string), e.g.
    ``realm_access.roles`` for Keycloak or ``groups``."""
    role_map: dict[str, str] = {}
    """External role/group name -> comfygate role; names equal to a configured role map to it."""
    default_role: str = ""
    """Role for a principal with no known role; empty = such a principal is refused (403)."""
    cache_size: int = Field(default=10_000, ge=0)
    """Verified tokens kept (until their exp) so a hot client skips the signature check."""

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm is required")
        bad = [a for a in value if a not in ALGORITHMS]
        if bad:
            raise ValueError(f"{bad}: not supported ('none' never is); use {sorted(ALGORITHMS)}")
        if set(value) & SYMMETRIC and set(value) - SYMMETRIC:
            # SECURITY: mixing HS* with asymmetric algorithms is how RS->HS confusion happens.
            raise ValueError("HS* and asymmetric algorithms cannot be mixed")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, value: str) -> str:
        if value and URL(value).scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL")
        return value


class SessionSettings(_Section):
    """The browser session cookie the proxy signs after a login."""

    secret: str = ""
    """HMAC key for session cookies (``secret_file`` / env). Empty: random per process."""
    cookie_name: str = "comfygate_session"
    """Name of the session cookie (never forwarded to ComfyUI)."""
    idle_timeout_seconds: float = Field(default=8 * 3600.0, gt=0)
    """Sliding lifetime: a session unused this long expires; use renews it."""
    absolute_timeout_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    """Hard limit from login, whatever the activity."""
    secure: Literal["auto", "always", "never"] = "auto"
    """``auto``: Secure when the request came over https (directly or via a trusted proxy)."""

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        # The session codec refuses a shorter HMAC key: found here, check-config reports it.
        if value and len(value.encode()) < SESSION_SECRET_MIN_BYTES:
            raise ValueError(
                f"must be at least {SESSION_SECRET_MIN_BYTES} bytes "
                "(e.g. `openssl rand -base64 48`, or run `comfygate init`)"
            )
        return value


class LoginSettings(_Section):
    """The login page."""

    users_file: str = ""
    """TOML file of users with argon2id password hashes (``comfygate user add``); empty = password
    login off (pasting an API token still works)."""
    allow_token_login: bool = True
    """Accept a pasted API token on the login page."""
    max_failures: int = Field(default=5, ge=1)
    """Failed logins allowed per client IP and per username within ``failure_window_seconds``."""
    failure_window_seconds: float = Field(default=300.0, gt=0)
    """The window ``max_failures`` counts in."""
    templates_dir: str = ""
    """Directory whose ``login.html`` overrides the built-in page."""


class AuthSettings(_Section):
    """Who may call ComfyUI through the proxy."""

    enabled: bool = True
    """False only for a trusted network: every request is then the ``anonymous_role``."""
    builtin_roles: bool = True
    """Start from the built-in roles (viewer, user, power, admin): a ``[roles.<name>]`` table adds
    a role or overrides the keys it sets of a built-in one. False: only the configured roles
    exist (replacing them all is then explicit)."""
    anonymous_role: str = "admin"
    """The role of every request when ``enabled`` is false."""
    jwt: JwtSettings = JwtSettings()
    session: SessionSettings = SessionSettings()
    login: LoginSettings = LoginSettings()
    oidc: OidcSettings = OidcSettings()
    """OpenID Connect login providers (``proxy.auth.oidc``, docs/sso.md)."""
    forward_auth: ForwardAuthSettings = ForwardAuthSettings()
    """Identity from a trusted authenticating proxy (``proxy.auth.forward_auth``)."""
    query_token_on_websocket: bool = True
    """Accept ``?token=`` on the WebSocket handshake (browsers cannot set headers there)."""
    query_token_on_http: bool = False
    """Also accept ``?token=`` on ComfyUI's HTTP API routes, for clients that can only add a
    query parameter. Off: a token in a URL ends up in browser history, shell history and the
    logs of anything in between (the proxy never logs it and strips it before ComfyUI)."""
    basic_auth: bool = True
    """Accept the API token as the HTTP Basic password (any user name), also on the WebSocket
    handshake, for clients that only know Basic auth or ``http://user:token@host`` URLs. It is
    the same token as a bearer one; because browsers re-send Basic credentials by themselves,
    such requests get the origin and CSRF checks of cookies. Never offered to browsers: no
    ``WWW-Authenticate: Basic`` is ever sent."""
    comfy_multi_user: bool = False
    """ComfyUI runs with ``--multi-user``: create each principal's ComfyUI user on first use."""
    forward_user_headers: bool = False
    """Also send ``X-Forwarded-User`` and ``X-Forwarded-Groups`` upstream."""
    relay_recheck_seconds: float = Field(default=30.0, ge=0)
    """How often open WebSockets have their credential re-checked (revoked or expired: closed
    with 1008); 0 = never."""
    revocation_cache_seconds: float = Field(default=1.0, ge=0, le=300)
    """With Redis: how long one token id's answer from the revocation list is reused by this
    process (a revocation made on another replica or with ``comfygate token revoke`` is honoured
    after at most this long; one made through this process at once); 0 = look up every request."""


class RoleSettings(_Section):
    """What one role may do. Roles are named in config: ``[roles.user]``, ``[roles.admin]``."""

    admin: bool = False
    """Sees and may do everything, including the admin-only routes."""
    allow_routes: tuple[str, ...] = ()
    """Admin-only route rules this role may use anyway (e.g. ``["free", "internal"]``)."""
    submit: bool = True
    """May queue prompts (false: read-only viewer)."""
    priority: bool = False
    """May use ``front``/``number`` to jump the queue."""
    rate_limits: dict[RouteClass, Limit] = {}
    """Per-class limits overriding ``[rate_limits.default]`` (``rate = "unlimited"`` lifts one).
    A principal with several roles gets, per class, the most generous of them."""
    queue_quota: int | None = Field(default=None, ge=0)
    """Unfinished prompts a user of this role may have (0 = unlimited); unset: the
    ``[rate_limits] queue_quota``."""


_ALL_UNLIMITED: dict[RouteClass, Limit] = {c: UNLIMITED_LIMIT for c in ROUTE_CLASSES}

DEFAULT_ROLES: dict[str, RoleSettings] = {
    "viewer": RoleSettings(submit=False),
    "user": RoleSettings(),
    "power": RoleSettings(
        rate_limits={
            "submit": Limit(rate="10/second", burst=50),
            "read": Limit(rate="50/second", burst=200),
            "upload": Limit(rate="300/minute", burst=60),
        },
        queue_quota=50,
    ),
    "admin": RoleSettings(admin=True, priority=True, rate_limits=_ALL_UNLIMITED, queue_quota=0),
}


def effective_roles(configured: Mapping[str, Any], *, builtin: bool) -> dict[str, Any]:
    """The ``roles`` table to validate: the built-in roles with the configured tables on top
    (``builtin``), else the configured tables alone.

    A table naming a built-in role overrides the keys it sets and keeps the others (``[roles.admin]
    queue_quota = 5`` leaves admin an admin); its ``rate_limits`` override per route class.
    """
    if not builtin:
        return dict(configured)
    merged: dict[str, Any] = {name: role.model_dump() for name, role in DEFAULT_ROLES.items()}
    for name, role in configured.items():
        raw = role.model_dump(exclude_unset=True) if isinstance(role, RoleSettings) else role
        base = merged.get(name)
        if not isinstance(raw, Mapping) or base is None:
            merged[name] = role  # a new role, or a malformed one validation will report
            continue
        combined = dict(base)
        for key, value in raw.items():
            if key == "rate_limits" and isinstance(value, Mapping):
                combined[key] = {**combined[key], **value}
            else:
                combined[key] = value
        merged[name] = combined
    return merged


def check_role_references(auth: AuthSettings, roles: dict[str, RoleSettings]) -> list[str]:
    """Cross-section rule: every role named in [auth] must be defined in [roles]."""
    problems = []
    names = set(roles)
    if auth.jwt.default_role and auth.jwt.default_role not in names:
        problems.append(f"auth.jwt.default_role: {auth.jwt.default_role!r} is not a defined role")
    for external, role in auth.jwt.role_map.items():
        if role not in names:
            problems.append(f"auth.jwt.role_map.{external}: {role!r} is not a defined role")
    problems += sso_role_problems(auth.oidc, auth.forward_auth, names)
    if not auth.enabled and auth.anonymous_role not in names:
        problems.append(f"auth.anonymous_role: {auth.anonymous_role!r} is not a defined role")
    return problems


__all__ = [
    "ALGORITHMS",
    "DEFAULT_ROLES",
    "SESSION_SECRET_MIN_BYTES",
    "AuthSettings",
    "JwtSettings",
    "LoginSettings",
    "RoleSettings",
    "SessionSettings",
    "check_role_references",
    "effective_roles",
]
