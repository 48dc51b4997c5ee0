"""Forward-auth: an authenticating proxy in front (oauth2-proxy, Authelia, Authentik's outpost,
Pomerium, Cloudflare Access) vouches for the person, and comfygate believes it - but only from
the proxy's own address.

Two ways to vouch (``[auth.forward_auth]``):

- plain headers (``X-Forwarded-User`` / ``-Email`` / ``-Groups`` by default): believed only when
  the TCP peer is in ``trusted_networks``. The peer is the connection's address, never
  ``X-Forwarded-For`` (which the client writes);
- a signed assertion (``assertion_header``, a JWT): verified with the auth proxy's JWKS
  (pinned algorithms, ``exp``, optional ``iss``/``aud``), also only from ``trusted_networks``.
  The plain headers are then ignored, so a hole in the auth proxy's header hygiene cannot be
  used to pick an identity.

From any other address these headers are not a credential (the request is authenticated as if
they were absent) and, like every identity header, they never reach ComfyUI
(``proxy.auth.identity.IDENTITY_HEADERS`` and ``ForwardAuthSettings.headers``).

A forwarded identity is *ambient* (the auth proxy adds it to whatever the browser sends), so
such requests get the origin and CSRF checks of session cookies.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt
import structlog
from aiohttp import web

from proxy.auth.keys import JwksKeys, KeySource, key_fits
from proxy.auth.tokens import check_signature
from proxy.errors import Forbidden, Unauthenticated
from proxy.principal import Principal
from proxy.settings.auth import RoleSettings
from proxy.settings.sso import ForwardAuthSettings

log = structlog.get_logger("comfygate.auth.forward")

MAX_VALUE_LENGTH = 256
MAX_GROUPS_LENGTH = 8192
MAX_ASSERTION_LENGTH = 16 * 1024
_PRINTABLE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
"""A header value we accept as a name: printable ASCII, no control characters, trimmed."""


def peer_trusted(request: web.Request, settings: ForwardAuthSettings) -> bool:
    """Whether the TCP peer is one of the trusted authenticating proxies."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False  # a Unix socket, or no peer at all: nothing to trust
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in settings.trusted_networks)


def presents_forwarded_identity(request: web.Request, settings: ForwardAuthSettings) -> bool:
    """Whether the request's identity comes from the auth proxy in front: forward-auth is on, the
    peer is trusted, and the header that names the person is present."""
    if not settings.enabled or not peer_trusted(request, settings):
        return False
    if settings.assertion_header:
        return settings.assertion_header in request.headers
    named = settings.user_header if settings.subject_from == "user" else settings.email_header
    return named in request.headers


class ForwardAuth:
    """Turns a trusted auth proxy's headers into a :class:`Principal`."""

    def __init__(
        self,
        settings: ForwardAuthSettings,
        roles: Mapping[str, RoleSettings],
        *,
        keys: KeySource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._roles = roles
        self._clock = clock
        if keys is None and settings.assertion_header:
            keys = JwksKeys(settings.assertion_jwks_url)
        self._keys = keys

    async def start(self) -> None:
        if self._keys is not None:
            await self._keys.start()

    async def close(self) -> None:
        if self._keys is not None:
            await self._keys.close()

    async def authenticate(self, request: web.Request) -> Principal:
        """The forwarded person (call only when :func:`presents_forwarded_identity`).

        Raises:
            Unauthenticated: malformed headers, or an assertion that does not verify.
            Forbidden: no configured role for the person.
        """
        if self.settings.assertion_header:
            subject, groups = await self._from_assertion(request)
        else:
            subject, groups = self._from_headers(request)
        mapped = {self.settings.role_map.get(g, g) for g in groups}
        roles = frozenset(r for r in mapped if r in self._roles)
        if not roles and self.settings.default_role in self._roles:
            roles = frozenset({self.settings.default_role})
        if not roles:
            log.info("forward_auth_refused", user=subject[:128], reason="no_role")
            raise Forbidden("none of your groups is a comfygate role", error_type="no_role")
        # No expiry: the auth proxy owns the person's session and re-vouches on every request.
        return Principal(subject=subject, roles=roles, source="forward")

    def _from_headers(self, request: web.Request) -> tuple[str, list[str]]:
        s = self.settings
        named = s.user_header if s.subject_from == "user" else s.email_header
        name = self._single(request, named, MAX_VALUE_LENGTH)
        if not name:
            raise self._refused(f"{named} is empty or malformed", "forward_auth_malformed")
        groups: list[str] = []
        if s.groups_header in request.headers:
            raw = self._single(request, s.groups_header, MAX_GROUPS_LENGTH)
            if raw is None:
                raise self._refused(f"{s.groups_header} is malformed", "forward_auth_malformed")
            groups = [g.strip() for g in raw.split(s.groups_separator) if g.strip()]
        return s.subject_prefix + name, groups

    @staticmethod
    def _single(request: web.Request, header: str, limit: int) -> str | None:
        """The header's one value when acceptable; None when repeated, too long or with
        control characters (what a reader of a repeated header takes is not to be left open)."""
        values = request.headers.getall(header, ())
        if len(values) != 1 or len(values[0]) > limit:
            return None
        value = values[0].strip()
        return value if _PRINTABLE.fullmatch(value) else None

    async def _from_assertion(self, request: web.Request) -> tuple[str, list[str]]:
        s = self.settings
        token = self._single(request, s.assertion_header, MAX_ASSERTION_LENGTH)
        if not token:
            raise self._refused("the forwarded assertion is malformed", "forward_auth_malformed")
        claims = await self._verified(token)
        now = self._clock()
        exp, nbf = _number(claims.get("exp")), _number(claims.get("nbf"))
        if exp is None:
            raise self._refused("the forwarded assertion has no exp", "forward_auth_invalid")
        if now >= exp + s.leeway_seconds:
            raise self._refused("the forwarded assertion has expired", "forward_auth_expired")
        if nbf is not None and nbf > now + s.leeway_seconds:
            raise self._refused("the forwarded assertion is not valid yet", "forward_auth_invalid")
        if s.assertion_issuer and claims.get("iss") != s.assertion_issuer:
            raise self._refused("the forwarded assertion's issuer", "forward_auth_invalid")
        if s.assertion_audience:
            aud = claims.get("aud")
            values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not set(s.assertion_audience) & {a for a in values if isinstance(a, str)}:
                raise self._refused("the forwarded assertion's audience", "forward_auth_invalid")
        subject = claim_at(claims, s.subject_claim)
        if not isinstance(subject, str) or not subject or len(subject) > MAX_VALUE_LENGTH:
            raise self._refused("the forwarded assertion names no subject", "forward_auth_invalid")
        return s.subject_prefix + subject, role_names(claim_at(claims, s.roles_claim))

    async def _verified(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, RecursionError):
            raise self._refused(
                "the forwarded assertion is not a JWT", "forward_auth_malformed"
            ) from None
        algorithm, kid = header.get("alg"), header.get("kid")
        # SECURITY: the header's alg is only compared with the configured (asymmetric) list.
        if algorithm not in self.settings.assertion_algorithms or not (
            kid is None or isinstance(kid, str)
        ):
            raise self._refused("the forwarded assertion's algorithm", "forward_auth_invalid")
        assert self._keys is not None  # built with assertion_header (see __init__)
        candidates = [
            k for k in await self._keys.candidates(algorithm, kid) if key_fits(algorithm, k)
        ]
        for key in candidates:
            try:
                claims = check_signature(token, key, algorithm)
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, RecursionError):
                break
            if isinstance(claims, dict):
                return claims
            break
        raise self._refused("the forwarded assertion does not verify", "forward_auth_invalid")

    @staticmethod
    def _refused(message: str, reason: str) -> Unauthenticated:
        log.info("forward_auth_refused", reason=reason, detail=message)
        return Unauthenticated(message, error_type=reason)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def role_names(value: Any) -> list[str]:
    """Role or group names from a claim: a list of strings, or one space/comma separated."""
    if isinstance(value, str):
        return [n for n in re.split(r"[\s,]+", value) if n]
    if isinstance(value, list):
        return [n for n in value if isinstance(n, str) and n]
    return []


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by exact name (namespaced claims such as ``https://x/roles``), else by dotted
    path (``realm_access.roles``)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


__all__ = ["ForwardAuth", "claim_at", "peer_trusted", "presents_forwarded_identity", "role_names"]
