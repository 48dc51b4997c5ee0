"""Whether a signed, unexpired session is still live: the credential behind it has not ended.

One check for every place that accepts a session - each request (:class:`Authenticator`), the
open-socket recheck (:mod:`proxy.auth.sweeper`) and the login page's "signed in as" - so that
they cannot disagree:

- the session id is not revoked (logout, on any replica);
- a session made from a pasted API token: the token's ``jti`` is not revoked (``comfygate token
  revoke``, or the revocation list's API), looked up through the same list (and cache) as bearer
  tokens, so the session ends when the token would be refused;
- a session made through an OpenID provider: the provider is still configured (its session id
  is revoked by logout like any other);
- a session made from a password: the user is still in the users file, with the same entry
  (:meth:`SessionCodec.user_generation`). ``comfygate user remove`` / ``user passwd`` or an edit
  of the user's roles end it. The users file is re-read when its mtime, size or inode change
  (:class:`UsersFile`), checked on each lookup: edits by the CLI need no restart or signal. A
  file that became unreadable or invalid keeps its last good contents (as for logins), so a
  botched edit does not sign everyone out. A role change ends the session rather than updating
  it: the holder signs in again and gets the new roles, and no socket keeps the old ones. An
  argon2 rehash at login (after a parameter upgrade) changes the entry too, ending that user's
  other sessions once.

A session's expiry (idle, absolute, capped at the token's ``exp``) is the codec's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.auth.sessions import SessionCodec
from proxy.auth.users import UsersFile
from proxy.principal import Session


class Denylist(Protocol):
    """What the check needs of :class:`proxy.auth.revocation.RevocationList`."""

    async def is_revoked(self, token_id: str) -> bool: ...


Ended = Literal[
    "signed_out",
    "token_revoked",
    "user_removed",
    "user_changed",
    "no_password_login",
    "provider_removed",
]
"""Why a session ended (logged; the client's ``error.type`` is ``session_revoked``)."""

MESSAGES: dict[Ended, str] = {
    "signed_out": "your session has ended; log in again",
    "token_revoked": "the token this session was signed in with has been revoked; log in again",
    "user_removed": "your account no longer exists",
    "user_changed": "your password or roles changed; log in again",
    "no_password_login": "password sign-in is no longer configured; log in again",
    "provider_removed": "the identity provider you signed in with is no longer configured",
}
"""What the client is told for each reason."""


@dataclass(slots=True)
class SessionLiveness:
    """The liveness check over the revocation list and the users file (None: no password
    login is configured, so no password session is live)."""

    revocations: Denylist
    users: UsersFile | None
    codec: SessionCodec
    oidc_providers: frozenset[str] = frozenset()
    """The configured OpenID providers: a session from another one is not live."""

    async def ended(self, session: Session) -> Ended | None:
        """None while the session's credential is live, else why it ended.

        Raises:
            RevocationUnavailable: the revocation list cannot be read (fail closed).
        """
        if await self.revocations.is_revoked(session.session_id):
            return "signed_out"
        if session.source == "token":
            if session.token_id is not None and await self.revocations.is_revoked(session.token_id):
                return "token_revoked"
            return None
        if session.source == "oidc":
            return None if session.provider in self.oidc_providers else "provider_removed"
        if self.users is None:
            return "no_password_login"
        # A dict lookup after one stat(): the file is re-read only when it changed on disk.
        record = self.users.get(session.subject)
        if record is None:
            return "user_removed"
        current = self.codec.user_generation(record.name, record.password_hash, record.roles)
        if current != session.user_generation:
            return "user_changed"
        return None


__all__ = ["MESSAGES", "Denylist", "Ended", "SessionLiveness"]
