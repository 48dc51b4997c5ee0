"""Who is calling: the authenticated principal every guard after authentication reads, and the
login session it may come from (vocabulary below every concern; ``proxy.auth`` makes them)."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from proxy.settings.auth import RoleSettings

Source = Literal["bearer", "basic", "cookie", "query", "forward", "anonymous"]
"""Where the credential came from. ``cookie``, ``basic`` and ``forward`` (an authenticating proxy
in front vouches for the browser: ``proxy.auth.forward_auth``) are *ambient*: they ride along
with any request the browser makes, so requests authenticated by them get the origin and CSRF
checks."""
AMBIENT_SOURCES: frozenset[Source] = frozenset({"cookie", "basic", "forward"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


SessionSource = Literal["password", "token", "oidc"]


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
    source: SessionSource = "token"
    """The credential the session was made from (the login page's method)."""
    token_id: str | None = None
    """``source == "token"``: the pasted token's ``jti`` (None if it had none); revoking it ends
    the session."""
    user_generation: str | None = None
    """``source == "password"``: ``proxy.auth.sessions.SessionCodec.user_generation`` of the
    user's entry at login; the session ends when the entry no longer has it."""
    provider: str | None = None
    """``source == "oidc"``: the name of the provider the person signed in with."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``roles`` are comfygate role names (defined in config)."""

    subject: str
    roles: frozenset[str]
    source: Source
    token_id: str | None = None
    """The token's ``jti`` or the session id: what revocation refers to."""
    expires_at: float | None = None
    session: Session | None = None
    """The session the principal came from (``source == "cookie"``): what the open-socket
    recheck asks :class:`proxy.auth.liveness.SessionLiveness` about."""

    @property
    def comfy_user(self) -> str:
        return comfy_user_id(self.subject)

    def is_admin(self, roles: Mapping[str, RoleSettings]) -> bool:
        return any(roles[r].admin for r in self.roles if r in roles)

    def may_use(self, rule: str, roles: Mapping[str, RoleSettings]) -> bool:
        """Whether one of the principal's roles grants the (admin-only) route rule."""
        return any(
            roles[r].admin or rule in roles[r].allow_routes for r in self.roles if r in roles
        )


@functools.lru_cache(maxsize=4096)  # several calls per request (limits, isolation, headers)
def comfy_user_id(subject: str) -> str:
    """A stable ComfyUI user id for a subject: only ``[A-Za-z0-9_-]`` (what ComfyUI keeps of a
    user name), readable, and unique thanks to a hash of the exact subject. Never starts with
    ``__`` (ComfyUI reserves that prefix for system users)."""
    readable = _UNSAFE.sub("-", subject).strip("-_")[:40] or "user"
    digest = hashlib.sha256(subject.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"
