"""Where the keys that verify bearer tokens come from: a shared secret, PEM public keys, a JWKS.

Every source answers one question, :meth:`KeySource.candidates`: which keys may verify a token
signed with ``alg`` (already checked against the configured list) and naming ``kid``. A key is
only ever offered for the algorithm family it belongs to (:func:`key_fits`): the HMAC secret for
HS*, RSA keys for RS*/PS*, the matching curve for ES*, Ed25519/Ed448 for EdDSA. That, not the
token's header, decides how a key is used.

The JWKS client fetches at startup, keeps the keys ``jwks_max_age_seconds``, refetches when a
token names an unknown ``kid`` (key rotation) but never more often than once per
``jwks_refetch_cooldown_seconds`` (a token's ``kid`` is attacker-controlled), and keeps the last
good keys while the endpoint is down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import jwt
import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from yarl import URL

from proxy.settings.auth import ALGORITHMS, SYMMETRIC

log = structlog.get_logger("comfygate.auth.keys")

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
VerificationKey = bytes | PublicKey
"""``bytes``: the HMAC secret (HS* only); otherwise a public key object, never a PEM string."""

MIN_RSA_BITS = 2048
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
MAX_JWKS_BYTES = 1 << 20

_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_ASYMMETRIC = ALGORITHMS - SYMMETRIC
_JWK_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


def key_fits(algorithm: str, key: VerificationKey | PrivateKey) -> bool:
    """Whether ``key`` belongs to ``algorithm``'s family (and curve, for ES*).

    SECURITY: this is what stops algorithm confusion. Only ``bytes`` (the configured secret) is
    ever an HMAC key, so a public key can never be used as an HS* secret, whatever a token says.
    """
    if algorithm.startswith("HS"):
        return isinstance(key, bytes)
    if algorithm.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey)
    if algorithm in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and (
            isinstance(key.curve, _EC_CURVES[algorithm])
        )
    if algorithm == "EdDSA":
        return isinstance(
            key,
            ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        )
    return False


def _pem_bytes(value: str) -> bytes:
    """A PEM given inline, or read from the path ``value``."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).expanduser().read_bytes()


def load_public_key(value: str) -> PublicKey:
    """A public key from a PEM string or a path to a PEM file (a public key or a certificate).

    Raises:
        OSError: ``value`` is a path that cannot be read.
        ValueError: not a PEM public key or certificate of a supported type.
    """
    data = _pem_bytes(value)
    key: Any
    try:
        if b"-----BEGIN CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except UnsupportedAlgorithm as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(key, PublicKey):
        raise ValueError(f"unsupported public key type {type(key).__name__}")
    _check_strength(key)
    return key


def _check_strength(key: PublicKey) -> None:
    # SECURITY: RSA below 2048 bits is factorable by a determined attacker (NIST SP 800-131A).
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required")


def load_private_key(value: str) -> PrivateKey:
    """A private key (unencrypted PEM string or path), for ``issue_token`` only.

    Raises:
        OSError: ``value`` is a path that cannot be read.
        ValueError: not an unencrypted PEM private key of a supported type.
    """
    try:
        key: Any = load_pem_private_key(_pem_bytes(value), password=None)
    except UnsupportedAlgorithm as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(key, PrivateKey):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


class KeySource(Protocol):
    """Keys that may verify a token; see the module docstring."""

    async def candidates(self, algorithm: str, kid: str | None) -> Sequence[VerificationKey]:
        """The keys to try, in order, for a token signed with ``algorithm`` naming ``kid``.
        Empty: no key is known for it (the verifier answers ``token_unknown_key``).

        Never raises for an unreachable key server: that yields the keys still known.
        """
        ...

    async def start(self) -> None:
        """Load what must be loaded before the first request (the JWKS)."""
        ...

    async def close(self) -> None: ...


class StaticKeys:
    """The configured secret (HS*) and PEM public keys: fixed for the process's life.

    A static key has no ``kid``: it is offered for any ``kid`` a token names.
    """

    def __init__(self, *, secret: bytes = b"", public_keys: Sequence[PublicKey] = ()) -> None:
        self._secret = secret
        self._public_keys = tuple(public_keys)

    async def candidates(self, algorithm: str, kid: str | None) -> Sequence[VerificationKey]:
        """See :meth:`KeySource.candidates`."""
        if algorithm.startswith("HS"):
            return (self._secret,) if self._secret else ()
        return tuple(k for k in self._public_keys if key_fits(algorithm, k))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Jwk:
    kid: str | None
    algorithm: str | None
    """The JWK's own ``alg``: when present, the key is offered for that algorithm only."""
    key: PublicKey


class JwksUnavailable(Exception):
    """The JWKS could not be fetched or parsed (internal: callers keep the stale keys)."""


class JwksKeys:
    """Public keys from an identity provider's JWKS endpoint (see the module docstring).

    ``session`` is the app's shared client session; without one the client makes (and closes)
    its own in :meth:`start`. ``clock`` is monotonic seconds, injectable for tests.
    """

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        max_age_seconds: float = 600.0,
        refetch_cooldown_seconds: float = 30.0,
        fetch_timeout_seconds: float = JWKS_FETCH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._session = session
        self._owns_session = session is None
        self._max_age = max_age_seconds
        self._cooldown = refetch_cooldown_seconds
        self._timeout = fetch_timeout_seconds
        self._clock = clock
        self._keys: tuple[_Jwk, ...] = ()
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._attempts = 0
        self._lock = asyncio.Lock()
        # Only the host goes to logs: a JWKS URL may carry credentials in its query.
        self._log = log.bind(jwks_host=URL(url).host or "")

    @property
    def fetches(self) -> int:
        """Fetch attempts so far (successful or not); for tests and metrics."""
        return self._attempts

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(k.kid for k in self._keys if k.kid is not None)

    async def start(self) -> None:
        """The startup fetch. A failure is logged, not raised: until the endpoint answers, tokens
        it signs are refused (``token_unknown_key``), which is safe, and a restart loop would
        not make the identity provider come back sooner."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
        await self._refresh(force=True)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def candidates(self, algorithm: str, kid: str | None) -> Sequence[VerificationKey]:
        """See :meth:`KeySource.candidates`: refreshes first when the keys are older than the max
        age, or when ``kid`` is unknown, in both cases at most once per cooldown."""
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._max_age:
            await self._refresh()
        found = self._match(algorithm, kid)
        if not found or (kid is not None and kid not in self.key_ids):
            # A kid we have not seen: the provider may have rotated its keys.
            await self._refresh()
            found = self._match(algorithm, kid)
        return found

    def _match(self, algorithm: str, kid: str | None) -> tuple[PublicKey, ...]:
        return tuple(
            k.key
            for k in self._keys
            if (kid is None or k.kid is None or k.kid == kid)
            and (k.algorithm is None or k.algorithm == algorithm)
            and key_fits(algorithm, k.key)
        )

    async def _refresh(self, *, force: bool = False) -> None:
        attempts = self._attempts
        async with self._lock:
            if self._attempts != attempts:
                return  # another request fetched while this one waited: use its result
            now = self._clock()
            if (
                not force
                and self._attempted_at is not None
                and now - self._attempted_at < self._cooldown
            ):
                # SECURITY: a token's kid is attacker-chosen; without a cooldown every forged
                # kid would make the proxy hit the identity provider.
                return
            self._attempted_at = now
            self._attempts += 1
            try:
                keys = await self._fetch()
            except JwksUnavailable as exc:
                self._log.warning("jwks_fetch_failed", error=str(exc), stale_keys=len(self._keys))
                return
            if not keys:
                self._log.warning("jwks_no_usable_keys", stale_keys=len(self._keys))
                return
            self._keys = keys
            self._fetched_at = now
            self._log.info("jwks_fetched", keys=len(keys))

    async def _fetch(self) -> tuple[_Jwk, ...]:
        if self._session is None:
            raise JwksUnavailable("not started")
        try:
            async with self._session.get(
                self.url,
                # identity: the app's shared session may not decompress (it relays bodies as-is).
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                if resp.status != 200:
                    raise JwksUnavailable(f"HTTP {resp.status}")
                body = await resp.content.read(MAX_JWKS_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise JwksUnavailable(type(exc).__name__) from None
        if len(body) > MAX_JWKS_BYTES:
            raise JwksUnavailable("document too large")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise JwksUnavailable("not JSON") from None
        raw_keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(raw_keys, list):
            raise JwksUnavailable("no 'keys' list")
        return tuple(k for k in (self._parse(j) for j in raw_keys) if k is not None)

    def _parse(self, jwk: Any) -> _Jwk | None:
        """One JWK, or None for a key that cannot or must not verify tokens."""
        if not isinstance(jwk, dict):
            return None
        kty, use, alg, kid = jwk.get("kty"), jwk.get("use"), jwk.get("alg"), jwk.get("kid")
        # SECURITY: symmetric ("oct") keys are never taken from a JWKS (a published HMAC key
        # would let anyone sign); encryption keys ("use": "enc") never verify signatures.
        if kty not in ("RSA", "EC", "OKP") or (use is not None and use != "sig"):
            return None
        if (alg is not None and alg not in _ASYMMETRIC) or (
            kid is not None and not isinstance(kid, str)
        ):
            return None
        parse_as = (
            alg
            or {"RSA": "RS256", "OKP": "EdDSA"}.get(kty)
            or _JWK_EC_ALGS.get(str(jwk.get("crv")))
        )
        if parse_as is None:
            return None
        try:
            key: Any = jwt.PyJWK(jwk, algorithm=parse_as).key
        except (jwt.PyJWTError, ValueError, TypeError):
            return None
        if isinstance(key, PrivateKey):
            # A provider publishing private parts is misconfigured; only the public half verifies.
            self._log.warning("jwks_private_key_published")
            key = key.public_key()
        if not isinstance(key, PublicKey):
            return None
        try:
            _check_strength(key)
        except ValueError:
            self._log.warning("jwks_weak_key_skipped")
            return None
        return _Jwk(kid=kid, algorithm=alg, key=key)


class CompositeKeys:
    """Several sources (static keys and a JWKS), asked in order."""

    def __init__(self, *sources: KeySource) -> None:
        self.sources = sources

    async def candidates(self, algorithm: str, kid: str | None) -> Sequence[VerificationKey]:
        """See :meth:`KeySource.candidates`."""
        found: list[VerificationKey] = []
        for source in self.sources:
            found.extend(await source.candidates(algorithm, kid))
        return found

    async def start(self) -> None:
        for source in self.sources:
            await source.start()

    async def close(self) -> None:
        for source in self.sources:
            await source.close()


__all__ = [
    "CompositeKeys",
    "JwksKeys",
    "KeySource",
    "PrivateKey",
    "PublicKey",
    "StaticKeys",
    "VerificationKey",
    "key_fits",
    "load_private_key",
    "load_public_key",
]
