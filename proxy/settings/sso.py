"""Configuration of single sign-on: ``[auth.oidc]`` (OpenID Connect login, one table per
provider: ``[auth.oidc.providers.<name>]``) and ``[auth.forward_auth]`` (identity vouched for by
a trusted authenticating proxy such as oauth2-proxy or Authelia)."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

PROVIDER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
"""A provider's name is part of its URLs (``/login/oidc/<name>``) and of its sessions."""
HEADER_NAME_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""What an identity provider may sign with (``proxy.settings.auth.ALGORITHMS`` minus HS*: that
module imports this one)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_endpoint_url(value: str) -> str:
    """An identity provider's URL: https, or plain http only on this machine's loopback (a
    token sent in clear over a network could be read by anyone on the path). No user info,
    query or fragment: an issuer is compared and concatenated exactly.

    Raises:
        ValueError: the URL is not acceptable (the message says why).
    """
    try:
        url = URL(value)
    except ValueError:
        raise ValueError("not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an absolute https URL")
    if url.scheme == "http" and url.host not in LOOPBACK_HOSTS:
        raise ValueError("must be https (plain http only for a provider on localhost)")
    if url.user or url.password or url.query_string or url.fragment:
        raise ValueError("must not carry credentials, a query or a fragment")
    return value


def _asymmetric(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("at least one algorithm is required")
    bad = [a for a in value if a not in ASYMMETRIC]
    if bad:
        # SECURITY: an ID token signed with a shared secret would be verifiable by anyone who
        # knows the client secret; and "none" is never accepted.
        raise ValueError(f"{bad}: only asymmetric algorithms ({sorted(ASYMMETRIC)})")
    return value


class OidcProviderSettings(_Section):
    """One OpenID provider (``[auth.oidc.providers.<name>]``)."""

    issuer: str
    """The provider's issuer URL, exactly as its ID tokens name it (``iss``); its
    ``/.well-known/openid-configuration`` is read from there."""
    client_id: str = Field(min_length=1)
    """The client ID registered at the provider; ID tokens must name it in ``aud``."""
    client_secret: str = ""
    """The client secret (``client_secret_file`` / env); empty only with
    ``token_auth_method = "none"`` (a public client: PKCE alone protects the code)."""
    token_auth_method: Literal["client_secret_basic", "client_secret_post", "none"] = (
        "client_secret_basic"  # noqa: S105 - the name of a client authentication method
    )
    """How comfygate authenticates at the token endpoint: ``client_secret_basic``,
    ``client_secret_post``, or ``none`` (a public client, PKCE only)."""
    label: str = Field(default="", max_length=64)
    """The login page's button text; empty: ``Sign in with <name>``."""
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    """Scopes asked for at sign-in; must include ``openid``."""
    extra_auth_params: dict[str, str] = {}
    """Added to the authorization request, e.g. Google's ``hd`` or ``prompt``."""
    algorithms: tuple[str, ...] = ("RS256",)
    """The ``alg`` values an ID token may use; anything else is refused."""
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    """Clock skew allowed on the ID token's ``exp``/``iat``."""
    roles_claim: str = "groups"
    """Dotted path to the provider's roles/groups (``realm_access.roles`` for Keycloak realm
    roles, ``groups`` for Authentik and Keycloak's group mapper)."""
    role_map: dict[str, str] = {}
    """Provider role/group name -> comfygate role; names equal to a configured role map to it."""
    default_role: str = ""
    """Role for a signed-in person with no mapped role; empty: refused (403 page)."""
    groups_claim: str = ""
    """Where ``allowed_groups`` looks (dotted path); empty: ``roles_claim``."""
    allowed_groups: tuple[str, ...] = ()
    """When set, only people in one of these groups may sign in."""
    allowed_email_domains: tuple[str, ...] = ()
    """When set, only people whose ``email`` ends in ``@<one of these>`` may sign in."""
    require_verified_email: bool = True
    """With ``allowed_email_domains``: the ``email_verified`` claim must be true."""
    max_session_seconds: float = Field(default=0.0, ge=0)
    """Upper bound of a session from this provider (0: ``auth.session.absolute_timeout``)."""
    rp_initiated_logout: bool = True
    """Sign-out also signs out at the provider when it offers an ``end_session_endpoint``."""
    discovery_max_age_seconds: float = Field(default=3600.0, gt=0)
    """How long the provider's ``/.well-known/openid-configuration`` is cached before it is
    read again."""
    http_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    """Timeout of each discovery, JWKS and token request to the provider (503
    ``provider_unavailable`` when it lapses)."""

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        return check_endpoint_url(value)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _asymmetric(value)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in value:
            raise ValueError("must include 'openid'")
        if any(not s or any(c.isspace() for c in s) for s in value):
            raise ValueError("scopes are single words")
        return value

    @field_validator("allowed_email_domains")
    @classmethod
    def _domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d.lower().lstrip("@") for d in value)

    @model_validator(mode="after")
    def _secret(self) -> OidcProviderSettings:
        if self.token_auth_method != "none" and not self.client_secret:  # noqa: S105
            raise ValueError(
                "client_secret (or client_secret_file) is required unless "
                "token_auth_method = 'none'"
            )
        return self


class OidcSettings(_Section):
    """OpenID Connect login (``[auth.oidc]``)."""

    providers: dict[str, OidcProviderSettings] = {}
    """One table per provider, ``[auth.oidc.providers.<name>]``: each adds a "Sign in with ..."
    button and ``/login/oidc/<name>``; none: no OIDC login."""
    flow_timeout_seconds: float = Field(default=600.0, gt=0, le=3600)
    """How long a started sign-in may take at the provider before its callback is refused."""

    @field_validator("providers")
    @classmethod
    def _names(cls, value: dict[str, OidcProviderSettings]) -> dict[str, OidcProviderSettings]:
        bad = [n for n in value if not PROVIDER_NAME_RE.fullmatch(n)]
        if bad:
            raise ValueError(f"{bad}: a provider name is [a-z0-9_-], at most 32 characters")
        return value


class ForwardAuthSettings(_Section):
    """Identity from a trusted authenticating proxy (``[auth.forward_auth]``)."""

    enabled: bool = False
    """Believe identity headers from the peers in ``trusted_networks``."""
    trusted_networks: tuple[Network, ...] = ()
    """Peers (the TCP connection's address, never ``X-Forwarded-For``) whose identity headers
    are believed. From anywhere else they are ignored, and never forwarded."""
    user_header: str = "X-Forwarded-User"
    """Header naming the person (the subject with ``subject_from = "user"``)."""
    email_header: str = "X-Forwarded-Email"
    """Header carrying the person's e-mail (the subject with ``subject_from = "email"``)."""
    groups_header: str = "X-Forwarded-Groups"
    """Header listing the person's groups, mapped to roles through ``role_map``."""
    subject_from: Literal["user", "email"] = "user"
    """Which header names the person (with ``assertion_header``: ignored, see subject_claim)."""
    subject_prefix: str = Field(default="forward:", max_length=64)
    """Prepended to the subject, so a forwarded ``alice`` is never the users file's ``alice``."""
    groups_separator: str = ","
    """Separates the groups in ``groups_header``."""
    role_map: dict[str, str] = {}
    """Forwarded group name -> comfygate role; names equal to a configured role map to it."""
    default_role: str = ""
    """Role for a forwarded person with no mapped group; empty: refused (403)."""
    assertion_header: str = ""
    """A header carrying a JWT signed by the auth proxy (e.g. ``X-Pomerium-Jwt-Assertion``,
    ``Cf-Access-Jwt-Assertion``). When set, identity comes from it alone: verified with
    ``assertion_jwks_url``; the plain headers above are ignored."""
    assertion_jwks_url: str = ""
    """The auth proxy's JWKS URL, which verifies ``assertion_header`` (required with it)."""
    assertion_issuer: str = ""
    """Required ``iss`` of the assertion; empty: not checked."""
    assertion_audience: tuple[str, ...] = ()
    """Accepted ``aud`` values of the assertion; empty: not checked."""
    assertion_algorithms: tuple[str, ...] = ("RS256", "ES256")
    """The ``alg`` values the assertion may use (asymmetric only); anything else is refused."""
    subject_claim: str = "sub"
    """The assertion's claim naming the person (prefixed with ``subject_prefix``)."""
    roles_claim: str = "groups"
    """Dotted path to the assertion's groups, mapped to roles through ``role_map``."""
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    """Clock skew allowed on the assertion's ``exp``/``nbf``."""

    @field_validator("user_header", "email_header", "groups_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not HEADER_NAME_RE.fullmatch(value):
            raise ValueError("must be a header name")
        return value

    @field_validator("assertion_header")
    @classmethod
    def _assertion_header(cls, value: str) -> str:
        if value and not HEADER_NAME_RE.fullmatch(value):
            raise ValueError("must be a header name")
        return value

    @field_validator("assertion_algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _asymmetric(value)

    @field_validator("assertion_jwks_url")
    @classmethod
    def _jwks(cls, value: str) -> str:
        return check_endpoint_url(value) if value else value

    @model_validator(mode="after")
    def _complete(self) -> ForwardAuthSettings:
        if self.enabled and not self.trusted_networks:
            raise ValueError("trusted_networks is required when forward_auth is enabled")
        if self.assertion_header and not self.assertion_jwks_url:
            raise ValueError("assertion_header needs assertion_jwks_url")
        return self

    @property
    def headers(self) -> tuple[str, ...]:
        """Every header this section reads: never forwarded to ComfyUI, whoever sent it."""
        named = (self.user_header, self.email_header, self.groups_header, self.assertion_header)
        return tuple(h for h in named if h)


def sso_role_problems(
    oidc: OidcSettings, forward: ForwardAuthSettings, roles: set[str]
) -> list[str]:
    """Cross-section rule: every role these sections name must be defined in [roles]."""
    problems = []
    for name, provider in oidc.providers.items():
        prefix = f"auth.oidc.providers.{name}"
        if provider.default_role and provider.default_role not in roles:
            problems.append(f"{prefix}.default_role: {provider.default_role!r} is not a role")
        for external, role in provider.role_map.items():
            if role not in roles:
                problems.append(f"{prefix}.role_map.{external}: {role!r} is not a defined role")
    if forward.default_role and forward.default_role not in roles:
        problems.append(f"auth.forward_auth.default_role: {forward.default_role!r} is not a role")
    for external, role in forward.role_map.items():
        if role not in roles:
            problems.append(f"auth.forward_auth.role_map.{external}: {role!r} is not a role")
    return problems


__all__ = [
    "ForwardAuthSettings",
    "OidcProviderSettings",
    "OidcSettings",
    "check_endpoint_url",
    "sso_role_problems",
]
