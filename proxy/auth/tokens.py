"""Bearer-token verification: a JWT in, a :class:`~proxy.principal.Principal` out.

Order of checks, cheapest and safest first::

    size and shape -> header alg in the configured list -> keys of that family (and kid)
    -> signature -> exp / nbf / iat / iss / aud / lifetime -> subject -> revocation -> roles

The signature is checked before any claim is looked at, and before Redis is asked anything, so an
unauthenticated caller can make the proxy do no more than one signature check. Verified tokens
are cached (keyed by a hash of the token, until its ``exp``), so a hot client skips the
signature check; the revocation check still runs on every call.

Time checks use the injected ``clock`` (not PyJWT's), so tests never sleep. Nothing here logs a
token, a part of one, or a claim value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import aiohttp
import jwt
import structlog

from proxy.auth.keys import (
    CompositeKeys,
    JwksKeys,
    KeySource,
    PublicKey,
    StaticKeys,
    VerificationKey,
    key_fits,
    load_private_key,
    load_public_key,
)
from proxy.auth.revocation import MAX_TOKEN_ID_LENGTH, RevocationList
from proxy.auth.sessions import SESSION_TYPE
from proxy.errors import SettingsError
from proxy.principal import Principal, Source
from proxy.settings.auth import SYMMETRIC, JwtSettings, RoleSettings

log = structlog.get_logger("comfygate.auth.tokens")

MAX_TOKEN_LENGTH = 16 * 1024
"""Longer is refused before any parsing (a large IdP token with many groups is ~4 KiB)."""
NO_EXP_CACHE_SECONDS = 300.0
"""Cache lifetime of a verified token without ``exp`` (only possible with require_exp off)."""
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
"""RFC 7518 §3.2: an HMAC key at least as long as the hash output."""

REASONS: Final = frozenset(
    {
        "token_malformed",
        "token_alg_not_allowed",
        "token_bad_signature",
        "token_unknown_key",
        "token_expired",
        "token_not_yet_valid",
        "token_missing_claim",
        "token_wrong_issuer",
        "token_wrong_audience",
        "token_missing_subject",
        "token_lifetime_too_long",
        "token_revoked",
    }
)

# PyJWT checks the signature only; every claim is checked below against the injected clock.
_SIGNATURE_ONLY: Final[jwt.types.Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}
_ROLE_SEPARATORS = re.compile(r"[\s,]+")


class InvalidToken(Exception):
    """The token is not accepted: ``reason`` is a stable ``error.type`` (see :data:`REASONS`),
    ``message`` a human sentence that never quotes the token or its claims."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class NoKnownRole(Exception):
    """A valid token whose roles map to no comfygate role, and no ``default_role``: the guard
    answers 403 ``no_role`` (the caller is known, just not allowed in)."""

    reason = "no_role"

    def __init__(self, subject: str) -> None:
        self.message = "none of the token's roles is a comfygate role"
        super().__init__(self.message)
        self.subject = subject


SignatureCheck = Callable[[str, VerificationKey, str], dict[str, Any]]
"""``(token, key, algorithm) -> claims``; raises ``jwt.InvalidSignatureError`` for a signature
that does not match ``key`` and ``jwt.DecodeError`` for a token that is not a JWT."""


def check_signature(token: str, key: VerificationKey, algorithm: str) -> dict[str, Any]:
    """PyJWT's signature check with exactly one algorithm and one key, no claim validation.

    Raises:
        jwt.InvalidSignatureError: the signature does not match ``key``.
        jwt.PyJWTError: the token is not a well-formed JWS, or ``key`` is unusable.
    """
    # SECURITY: algorithms=[algorithm], the one the caller already checked against the
    # configured list and matched to the key's family; never a list taken from the token.
    return jwt.decode(token, key, algorithms=[algorithm], options=_SIGNATURE_ONLY)


@dataclasses.dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal
    valid_until: float


class TokenVerifier:
    """Verifies bearer tokens against :class:`JwtSettings` and maps them to principals.

    ``check_signature`` is a seam for tests (count signature checks); the default is
    :func:`check_signature`.
    """

    def __init__(
        self,
        settings: JwtSettings,
        roles: Mapping[str, RoleSettings],
        *,
        keys: KeySource,
        revocations: RevocationList,
        clock: Callable[[], float] = time.time,
        check_signature: SignatureCheck = check_signature,
    ) -> None:
        self.settings = settings
        self.roles = roles
        self.keys = keys
        self.revocations = revocations
        self._clock = clock
        self._check_signature = check_signature
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()

    async def start(self) -> None:
        """Fetch what the key sources need (the JWKS) before the first request."""
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    async def verify(self, token: str, *, source: Source = "bearer") -> Principal:
        """The principal a bearer token stands for.

        Raises:
            InvalidToken: the token is refused; ``reason`` says why (401 for the guard).
            NoKnownRole: the token is valid but grants no comfygate role (403 ``no_role``).
            RevocationUnavailable: the denylist cannot be read (503; fail closed).
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token_malformed", "the token is empty or too long")
        # The cache key is a hash: the cache neither keeps tokens nor compares them byte-wise.
        cache_key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        cached = self._cache.get(cache_key)
        if cached is not None:
            if now < cached.valid_until:
                self._cache.move_to_end(cache_key)
                await self._check_revoked(cached.principal.token_id)
                principal = cached.principal
                if principal.source != source:
                    principal = dataclasses.replace(principal, source=source)
                return principal
            del self._cache[cache_key]

        claims = await self._verified_claims(token)
        exp = self._check_times(claims, now)
        self._check_issuer_audience(claims)
        subject = _subject(claims, self.settings.subject_claim)
        token_id = _token_id(claims)
        await self._check_revoked(token_id)
        principal = Principal(
            subject=subject,
            roles=self._map_roles(claims, subject),
            source=source,
            token_id=token_id,
            expires_at=exp,
        )
        self._remember(cache_key, principal, now + NO_EXP_CACHE_SECONDS if exp is None else exp)
        return principal

    async def _verified_claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        # pyjwt 2.10 lets json's RecursionError (a deeply nested header) escape; later ones wrap it.
        except (jwt.PyJWTError, RecursionError):
            raise InvalidToken("token_malformed", "the token is not a JWT") from None
        algorithm = header.get("alg")
        # SECURITY: the header's alg is only ever compared with the configured list; "none" and
        # anything unlisted (e.g. HS256 against an RS256 setup: key confusion) stop here.
        if not isinstance(algorithm, str) or algorithm not in self.settings.algorithms:
            raise InvalidToken("token_alg_not_allowed", "the token's algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("token_malformed", "the token's kid is not a string")
        # SECURITY: jku/x5u/jwk/x5c header parameters are never read: keys come from config only.
        candidates = [
            k for k in await self.keys.candidates(algorithm, kid) if key_fits(algorithm, k)
        ]
        if not candidates:
            raise InvalidToken("token_unknown_key", "no key is known for this token")
        for key in candidates:
            try:
                claims = self._check_signature(token, key, algorithm)
            except jwt.InvalidSignatureError:
                continue  # another key of the set may have signed it (rotation overlap)
            except jwt.InvalidKeyError:
                log.warning("token_key_unusable", algorithm=algorithm)
                continue
            except (jwt.PyJWTError, RecursionError):
                raise InvalidToken("token_malformed", "the token is not a valid JWT") from None
            if not isinstance(claims, dict):
                raise InvalidToken("token_malformed", "the token's payload is not an object")
            if claims.get("typ") == SESSION_TYPE:
                # A session cookie signed with the same secret (an operator reusing it) must
                # not double as a bearer token.
                raise InvalidToken("token_malformed", "a session cookie is not a bearer token")
            return claims
        raise InvalidToken("token_bad_signature", "the token's signature does not verify")

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float | None:
        """The token's ``exp`` (None when it has none and none is required by the settings).

        Raises:
            InvalidToken: missing/expired/not yet valid/lifetime above the maximum.
        """
        s = self.settings
        exp, nbf, iat = (_numeric(claims, name) for name in ("exp", "nbf", "iat"))
        if exp is None and (s.require_exp or s.max_lifetime_seconds > 0):
            raise InvalidToken("token_missing_claim", "the token has no exp claim")
        if exp is not None and now >= exp + s.leeway_seconds:
            raise InvalidToken("token_expired", "the token has expired")
        if nbf is not None and nbf > now + s.leeway_seconds:
            raise InvalidToken("token_not_yet_valid", "the token is not valid yet (nbf)")
        if iat is not None and iat > now + s.leeway_seconds:
            raise InvalidToken("token_not_yet_valid", "the token is issued in the future (iat)")
        if s.max_lifetime_seconds > 0 and exp is not None:
            too_long = (
                exp - iat > s.max_lifetime_seconds
                if iat is not None
                # No iat: what is left of it must fit (leeway for the issuer's clock).
                else exp - now > s.max_lifetime_seconds + s.leeway_seconds
            )
            if too_long:
                raise InvalidToken("token_lifetime_too_long", "the token's lifetime is too long")
        return exp

    def _check_issuer_audience(self, claims: Mapping[str, Any]) -> None:
        s = self.settings
        if s.issuer:
            if "iss" not in claims:
                raise InvalidToken("token_missing_claim", "the token has no iss claim")
            if claims["iss"] != s.issuer:
                raise InvalidToken("token_wrong_issuer", "the token's issuer is not accepted")
        if s.audience:
            if "aud" not in claims:
                raise InvalidToken("token_missing_claim", "the token has no aud claim")
            aud = claims["aud"]
            values = [aud] if isinstance(aud, str) else aud
            if not isinstance(values, list) or not all(isinstance(a, str) for a in values):
                raise InvalidToken("token_malformed", "the token's aud claim is malformed")
            if not set(values) & set(s.audience):
                raise InvalidToken("token_wrong_audience", "the token's audience is not accepted")

    async def _check_revoked(self, token_id: str | None) -> None:
        if token_id is not None and await self.revocations.is_revoked(token_id):
            raise InvalidToken("token_revoked", "the token has been revoked")

    def _map_roles(self, claims: Mapping[str, Any], subject: str) -> frozenset[str]:
        """Raises:
        NoKnownRole: no external name maps to a configured role and no ``default_role``.
        """
        mapped = set()
        for name in _role_names(_claim(claims, self.settings.roles_claim)):
            role = self.settings.role_map.get(name, name)
            if role in self.roles:
                mapped.add(role)
        if not mapped and self.settings.default_role in self.roles:
            mapped.add(self.settings.default_role)
        if not mapped:
            raise NoKnownRole(subject)
        return frozenset(mapped)

    def _remember(self, key: bytes, principal: Principal, valid_until: float) -> None:
        if self.settings.cache_size <= 0:
            return
        self._cache[key] = _Cached(principal, valid_until)
        self._cache.move_to_end(key)
        while len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    # SECURITY: JSON allows NaN/Infinity in Python's parser; NaN compares false both ways and
    # would pass every time check. Booleans are ints to Python, not NumericDates.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken("token_malformed", f"the token's {name} claim is not a number")
    return float(value)


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path (``realm_access.roles``). The exact name wins, so
    namespaced claims such as ``https://example.com/roles`` keep working."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _role_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [n for n in _ROLE_SEPARATORS.split(value) if n]
    if isinstance(value, list):
        return [n for n in value if isinstance(n, str) and n]
    return []


def _subject(claims: Mapping[str, Any], name: str) -> str:
    subject = _claim(claims, name)
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("token_missing_subject", "the token names no subject")
    return subject


def _token_id(claims: Mapping[str, Any]) -> str | None:
    jti = claims.get("jti")
    if jti is None:
        return None
    if not isinstance(jti, str) or not jti or len(jti) > MAX_TOKEN_ID_LENGTH:
        raise InvalidToken("token_malformed", "the token's jti claim is malformed")
    return jti


def _set_claim(claims: dict[str, Any], path: str, value: Any) -> None:
    """Set a claim at a dotted path (creating the objects on the way)."""
    *parents, last = path.split(".")
    target = claims
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"claim {path!r}: {part!r} is not an object")
        target = child
    target[last] = value


def issue_token(
    settings: JwtSettings,
    *,
    subject: str,
    roles: Sequence[str],
    ttl_seconds: float,
    extra: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[str, str]:
    """A signed token ``(token, jti)`` for ``comfygate token create`` and tests.

    Signs with the first configured algorithm: ``secret`` for HS*, ``private_key`` otherwise.
    Sets ``sub``, ``roles``, ``iat``, ``exp``, a random ``jti``, and ``iss``/``aud`` when
    configured; the subject and roles also go to ``subject_claim``/``roles_claim`` when those
    differ, so the token verifies under the same settings.

    Raises:
        ValueError: empty subject, ``ttl_seconds`` not positive or above
            ``max_lifetime_seconds``, no signing key configured, a key of the wrong family, or
            ``extra`` overriding a claim this function sets.
        OSError: ``private_key`` is a path that cannot be read.
    """
    if not subject:
        raise ValueError("subject must not be empty")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    if 0 < settings.max_lifetime_seconds < ttl_seconds:
        raise ValueError("ttl_seconds exceeds auth.jwt.max_lifetime_seconds")
    algorithm = settings.algorithms[0]
    key: bytes | Any
    if algorithm in SYMMETRIC:
        if not settings.secret:
            raise ValueError("auth.jwt.secret is empty: cannot sign HS* tokens")
        key = settings.secret.encode()
    else:
        if not settings.private_key:
            raise ValueError(f"auth.jwt.private_key is empty: cannot sign {algorithm} tokens")
        key = load_private_key(settings.private_key)
        if not key_fits(algorithm, key):
            raise ValueError(f"auth.jwt.private_key does not fit {algorithm}")

    now = clock()
    issued = math.floor(now)
    jti = secrets.token_urlsafe(16)
    claims: dict[str, Any] = {
        "sub": subject,
        "roles": list(roles),
        "iat": issued,
        # Floor, so the lifetime never exceeds the requested ttl (nor max_lifetime_seconds).
        "exp": issued + max(1, math.floor(ttl_seconds)),
        "jti": jti,
    }
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience[0]
    if settings.subject_claim != "sub":
        _set_claim(claims, settings.subject_claim, subject)
    if settings.roles_claim != "roles":
        _set_claim(claims, settings.roles_claim, list(roles))
    for name, value in (extra or {}).items():
        if name in claims:
            raise ValueError(f"extra claim {name!r} would override a claim issue_token sets")
        claims[name] = value
    return jwt.encode(claims, key, algorithm=algorithm), jti


def _public_keys(settings: JwtSettings) -> tuple[list[PublicKey], list[str]]:
    problems: list[str] = []
    public_keys: list[PublicKey] = []
    for index, value in enumerate(settings.public_keys):
        try:
            public_keys.append(load_public_key(value))
        except (OSError, ValueError) as exc:
            problems.append(f"auth.jwt.public_keys[{index}]: {type(exc).__name__}: {exc}")
    if not settings.public_keys and not settings.jwks_url:
        problems.append(f"auth.jwt: {settings.algorithms[0]} needs public_keys or jwks_url")
    return public_keys, problems


def key_problems(settings: JwtSettings) -> list[str]:
    """What :func:`build_verifier` would refuse for asymmetric algorithms (none for HS*): the
    same lines, for ``check-config``."""
    if settings.algorithms[0] in SYMMETRIC:
        return []
    return _public_keys(settings)[1]


def build_verifier(
    settings: JwtSettings,
    roles: Mapping[str, RoleSettings],
    *,
    session: aiohttp.ClientSession | None,
    revocations: RevocationList,
) -> TokenVerifier:
    """The verifier the app uses, with key sources built from ``settings``. Call
    :meth:`TokenVerifier.start` before serving (it fetches the JWKS) and ``close`` after.

    Raises:
        SettingsError: a public key cannot be loaded, or an asymmetric algorithm has no key
            source (neither ``public_keys`` nor ``jwks_url``).
    """
    symmetric = settings.algorithms[0] in SYMMETRIC
    if symmetric:
        min_bytes = max(MIN_SECRET_BYTES[a] for a in settings.algorithms)
        secret = settings.secret.encode()
        if not secret:
            secret = secrets.token_bytes(64)
            log.warning(
                "jwt_secret_random",
                detail="tokens issued by `comfygate token create` will not verify; "
                "set auth.jwt.secret",
            )
        elif len(secret) < min_bytes:
            log.warning("jwt_secret_short", min_bytes=min_bytes)
        if settings.public_keys or settings.jwks_url:
            # SECURITY: public keys are never HMAC secrets; they are simply not used.
            log.warning("jwt_public_keys_ignored", detail="HS* algorithms use auth.jwt.secret")
        return TokenVerifier(
            settings, roles, keys=StaticKeys(secret=secret), revocations=revocations
        )

    public_keys, problems = _public_keys(settings)
    if problems:
        raise SettingsError(problems)
    sources: list[KeySource] = []
    if public_keys:
        sources.append(StaticKeys(public_keys=public_keys))
    if settings.jwks_url:
        sources.append(
            JwksKeys(
                settings.jwks_url,
                session=session,
                max_age_seconds=settings.jwks_max_age_seconds,
                refetch_cooldown_seconds=settings.jwks_refetch_cooldown_seconds,
            )
        )
    keys = sources[0] if len(sources) == 1 else CompositeKeys(*sources)
    return TokenVerifier(settings, roles, keys=keys, revocations=revocations)


__all__ = [
    "MIN_SECRET_BYTES",
    "REASONS",
    "InvalidToken",
    "NoKnownRole",
    "SignatureCheck",
    "TokenVerifier",
    "build_verifier",
    "check_signature",
    "issue_token",
    "key_problems",
]
