"""Ends WebSocket relays whose credential stopped being valid after the handshake.

A socket is authenticated once, at the handshake, and may stay open for days. Every
``auth.relay_recheck_seconds`` the sweeper checks the credential behind each open relay: expired
(token ``exp``, session absolute limit, itself capped at a pasted token's ``exp``) or ended
(logout on any replica, ``comfygate token revoke`` of the token or of the token a session was
signed in with, ``comfygate user remove|passwd`` or a role change of a session's user: see
:class:`proxy.auth.liveness.SessionLiveness`) closes the socket with 1008 (policy violation).
Logout on this replica closes at once.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from proxy.auth.authenticator import AUTH
from proxy.errors import ServiceUnavailable
from proxy.observability.metrics import METRICS
from proxy.periodic import Periodic
from proxy.settings import SETTINGS
from proxy.state import LIFECYCLE, POLICY_VIOLATION

log = structlog.get_logger("comfygate.auth")


async def sweep_once(app: web.Application, *, now: float | None = None) -> int:
    """One pass over the open relays; returns how many were closed. ``now``: epoch seconds to
    judge expiry by (tests pass a later time rather than wait)."""
    lifecycle, auth = app[LIFECYCLE], app[AUTH]
    now = time.time() if now is None else now
    closed = 0
    for ws, principal in list(lifecycle.relay_principals.items()):
        if ws.closed:
            continue  # already closing; its relay removes it
        reason = ""
        if principal.expires_at is not None and principal.expires_at <= now:
            reason = "credential expired"
        else:
            try:
                if principal.session is not None:
                    ended = await auth.liveness.ended(principal.session)
                    if ended is not None:
                        reason = "credential revoked"
                elif principal.token_id is not None and await auth.revocations.is_revoked(
                    principal.token_id
                ):
                    reason = "credential revoked"
            except ServiceUnavailable:
                return closed  # the revocation list is down: try again next time
        if reason:
            await ws.close(code=POLICY_VIOLATION, message=reason.encode())
            log.info("relay_credential_ended", user=principal.subject, reason=reason)
            closed += 1
    return closed


async def relay_sweeper(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: run :func:`sweep_once` periodically while the app serves (a failed
    pass is logged, counted and followed by the next one)."""
    interval = app[SETTINGS].auth.relay_recheck_seconds
    loop = Periodic(
        functools.partial(sweep_once, app),
        interval,
        name="relay-sweeper",
        log=log,
        event="relay_sweep_failed",
        failures=app[METRICS].task_failures,
    )
    if interval > 0:
        loop.start()
    yield
    await loop.stop()
