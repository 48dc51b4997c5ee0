"""Browser sessions: a short-lived, proxy-signed cookie with sliding renewal.

The cookie holds a compact HS256 JWT signed with the session secret (never the API token
secret), so sessions cannot be forged from API tokens or the other way round (``typ`` and a
distinct key). Idle expiry slides on use; an absolute limit from login bounds it. Logout revokes
the session id (``sid``), so a copied cookie dies with the logout.

A session also records the credential it was made from (``src``), and lives no longer than it:

- ``token``: an API token pasted on the login page. The token's ``jti`` (``tjti``) is checked
  against the revocation list with the session id, and the absolute limit is the token's ``exp``.
- ``oidc``: an OpenID provider (``prov``: the configured provider's name). The session id is
  what ends it (logout); it lives while its provider stays configured.
- ``password``: the users file. ``ugen`` is a keyed digest of the user's entry (name, password
  hash, roles) at login; a removed user, a new password or new roles no longer match it.

:class:`proxy.auth.liveness.SessionLiveness` makes those checks; this module only carries them.
A cookie without ``src`` (from a release before these checks) is refused: nothing ties it to a
credential that can still be revoked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable

import jwt

from proxy.principal import Session, SessionSource
from proxy.settings.auth import SESSION_SECRET_MIN_BYTES, SessionSettings

SESSION_TYPE = "comfygate-session"
ALGORITHM = "HS256"


class InvalidSession(Exception):
    """The cookie is not a valid, live session (``reason`` is a stable error type)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionCodec:
    """Issues and verifies session cookies."""

    def __init__(
        self,
        settings: SessionSettings,
        secret: bytes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < SESSION_SECRET_MIN_BYTES:
            raise ValueError(f"session secret must be at least {SESSION_SECRET_MIN_BYTES} bytes")
        self.settings = settings
        self._secret = secret
        self._clock = clock

    def issue(
        self,
        subject: str,
        roles: Iterable[str],
        *,
        source: SessionSource,
        token_id: str | None = None,
        not_after: float | None = None,
        user_generation: str | None = None,
        provider: str | None = None,
    ) -> tuple[str, Session]:
        """A new session after a successful login.

        ``source="token"``: ``token_id`` and ``not_after`` are the pasted token's ``jti`` and
        ``exp`` (the session never outlives the token). ``source="password"``:
        ``user_generation`` is required (see :meth:`user_generation`).

        Raises:
            ValueError: a password session without ``user_generation``, or credentials of the
                other source.
        """
        if source == "password" and (not user_generation or token_id or not_after is not None):
            raise ValueError("a password session needs user_generation (and no token claims)")
        if source == "token" and user_generation is not None:
            raise ValueError("a token session has no user_generation")
        if (source == "oidc") != bool(provider) or (source == "oidc" and user_generation):
            raise ValueError("an oidc session needs its provider (and only oidc sessions have one)")
        now = self._clock()
        absolute = now + self.settings.absolute_timeout_seconds
        session = Session(
            subject=subject,
            roles=tuple(sorted(roles)),
            session_id=secrets.token_urlsafe(16),
            issued_at=now,
            expires_at=0.0,
            absolute_expires_at=absolute if not_after is None else min(absolute, not_after),
            source=source,
            token_id=token_id,
            user_generation=user_generation,
            provider=provider,
        )
        return self._encode(session, now)

    def user_generation(self, name: str, password_hash: str, roles: Iterable[str]) -> str:
        """A digest of one users-file entry, keyed with the session secret (the cookie is
        readable by its holder and must not carry anything derived from the hash alone). Any
        change to the entry - a new password (a new salt, even for the same password), other
        roles, the user removed and added again - gives another value."""
        message = "\0".join(("comfygate-user-generation", name, password_hash, *sorted(roles)))
        digest = hmac.new(self._secret, message.encode(), hashlib.sha256).digest()[:18]
        return base64.urlsafe_b64encode(digest).decode()

    def renew(self, session: Session) -> tuple[str, Session]:
        """The same session with its idle expiry moved forward (never past the absolute one)."""
        return self._encode(session, self._clock())

    def needs_renewal(self, session: Session) -> bool:
        """Renew once half of the idle timeout has passed, not on every request."""
        remaining = session.expires_at - self._clock()
        return (
            remaining < self.settings.idle_timeout_seconds / 2
            and session.expires_at < session.absolute_expires_at
        )

    def verify(self, value: str) -> Session:
        """Raises:
        InvalidSession: forged, malformed, of another type, or expired (idle or absolute).
        """
        try:
            claims = jwt.decode(
                value,
                self._secret,
                algorithms=[ALGORITHM],
                # Expiry is checked below against the injectable clock, not PyJWT's.
                options={
                    "require": ["exp", "sub", "sid", "iat", "aexp", "typ"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError:
            raise InvalidSession("session_invalid") from None
        if claims.get("typ") != SESSION_TYPE or not isinstance(claims.get("roles"), list):
            raise InvalidSession("session_invalid")
        source, token_id, generation = claims.get("src"), claims.get("tjti"), claims.get("ugen")
        provider = claims.get("prov")
        # SECURITY: a session must say which credential it came from, so that it ends with it.
        if source == "oidc":
            tied = isinstance(provider, str) and bool(provider)
            tied = tied and token_id is None and generation is None
        elif provider is not None:
            tied = False
        elif source == "password":
            tied = isinstance(generation, str) and bool(generation) and token_id is None
        else:
            tied = source == "token" and generation is None
            tied = tied and (token_id is None or (isinstance(token_id, str) and bool(token_id)))
        if not tied:
            raise InvalidSession("session_invalid")
        now = self._clock()
        if float(claims["exp"]) <= now or float(claims["aexp"]) <= now:
            raise InvalidSession("session_expired")
        return Session(
            subject=str(claims["sub"]),
            roles=tuple(str(r) for r in claims["roles"]),
            session_id=str(claims["sid"]),
            issued_at=float(claims["iat"]),
            expires_at=float(claims["exp"]),
            absolute_expires_at=float(claims["aexp"]),
            source="oidc" if source == "oidc" else "password" if source == "password" else "token",
            token_id=token_id,
            user_generation=generation,
            provider=provider,
        )

    def _encode(self, session: Session, now: float) -> tuple[str, Session]:
        expires = min(now + self.settings.idle_timeout_seconds, session.absolute_expires_at)
        fresh = Session(
            subject=session.subject,
            roles=session.roles,
            session_id=session.session_id,
            issued_at=session.issued_at,
            expires_at=expires,
            absolute_expires_at=session.absolute_expires_at,
            source=session.source,
            token_id=session.token_id,
            user_generation=session.user_generation,
            provider=session.provider,
        )
        claims: dict[str, object] = {
            "typ": SESSION_TYPE,
            "sub": fresh.subject,
            "roles": list(fresh.roles),
            "sid": fresh.session_id,
            "iat": int(fresh.issued_at),
            "exp": int(fresh.expires_at),
            "aexp": int(fresh.absolute_expires_at),
            "src": fresh.source,
        }
        if fresh.token_id is not None:
            claims["tjti"] = fresh.token_id
        if fresh.user_generation is not None:
            claims["ugen"] = fresh.user_generation
        if fresh.provider is not None:
            claims["prov"] = fresh.provider
        value = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        return value, fresh
