"""Browser sessions: a short-lived, proxy-signed cookie with sliding renewal.

The cookie holds a compact HS256 JWT signed with the session secret (never the API token
secret), so sessions cannot be forged from API tokens or the other way round (``typ`` and a
distinct key). Idle expiry slides on use; an absolute limit from login bounds it. Logout revokes
the session id (``sid``), so a copied cookie dies with the logout.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jwt

from proxy.auth.settings import SessionSettings

SESSION_TYPE = "comfygate-session"
ALGORITHM = "HS256"


class InvalidSession(Exception):
    """The cookie is not a valid, live session (``reason`` is a stable error type)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Session:
    subject: str
    roles: tuple[str, ...]
    session_id: str
    issued_at: float
    """Login time: the absolute timeout counts from here."""
    expires_at: float
    """Idle expiry of this cookie."""
    absolute_expires_at: float


class SessionCodec:
    """Issues and verifies session cookies."""

    def __init__(
        self,
        settings: SessionSettings,
        secret: bytes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 32:
            raise ValueError("session secret must be at least 32 bytes")
        self.settings = settings
        self._secret = secret
        self._clock = clock

    def issue(self, subject: str, roles: Iterable[str]) -> tuple[str, Session]:
        """A new session after a successful login."""
        now = self._clock()
        session = Session(
            subject=subject,
            roles=tuple(sorted(roles)),
            session_id=secrets.token_urlsafe(16),
            issued_at=now,
            expires_at=0.0,
            absolute_expires_at=now + self.settings.absolute_timeout_seconds,
        )
        return self._encode(session, now)

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
        )
        value = jwt.encode(
            {
                "typ": SESSION_TYPE,
                "sub": fresh.subject,
                "roles": list(fresh.roles),
                "sid": fresh.session_id,
                "iat": int(fresh.issued_at),
                "exp": int(fresh.expires_at),
                "aexp": int(fresh.absolute_expires_at),
            },
            self._secret,
            algorithm=ALGORITHM,
        )
        return value, fresh
