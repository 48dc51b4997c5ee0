"""Whether each ComfyUI instance runs with ``--multi-user``, learnt from ``GET /users``.

ComfyUI answers ``GET /users`` with ``{"storage": "server", "users": {...}}`` in multi-user mode
and ``{"storage": "server", "migrated": <bool>}`` without it (``app/user_manager.py``). Only in
multi-user mode does it honour the ``Comfy-User`` header the proxy sets; otherwise every request
is user ``default`` and saved workflows, settings and ``user.css`` are one shared set, so the
proxy has to give each user a space of its own (:mod:`proxy.userdata.handler`).

The answer is kept for :data:`RECHECK_SECONDS` per instance (a ComfyUI restarted without the flag
is noticed within that time). An answer that cannot be read counts as single-user: confining a
user to a folder of their own is safe either way, trusting ComfyUI to separate users is not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import orjson
import structlog
from aiohttp import hdrs

from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.userdata")

RECHECK_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class UserMode:
    """What one probe of an instance learnt."""

    multi_user: bool
    known: bool
    """False: ComfyUI could not be asked or answered something else (treated as single-user)."""
    checked_at: float


class UserModes:
    """Per-instance ``--multi-user`` detection, cached and coalesced."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._modes: dict[str, UserMode] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.startup: asyncio.Task[None] | None = None
        """The startup probe of every known instance (tests await it)."""

    async def multi_user(self, upstream: Upstream) -> bool:
        """Whether ``upstream`` keeps users apart itself (``--multi-user``)."""
        mode = self._modes.get(upstream.name)
        if mode is not None and time.monotonic() - mode.checked_at < RECHECK_SECONDS:
            return mode.multi_user
        lock = self._locks.setdefault(upstream.name, asyncio.Lock())
        async with lock:  # one probe per instance, however many requests wait for it
            mode = self._modes.get(upstream.name)
            if mode is None or time.monotonic() - mode.checked_at >= RECHECK_SECONDS:
                mode = await self.probe(upstream)
            return mode.multi_user

    async def probe(self, upstream: Upstream) -> UserMode:
        """Ask ``upstream`` now, remember the answer and log what changed."""
        multi = await self._ask(upstream)
        mode = UserMode(
            multi_user=bool(multi), known=multi is not None, checked_at=time.monotonic()
        )
        previous = self._modes.get(upstream.name)
        self._modes[upstream.name] = mode
        if previous is None or (previous.multi_user, previous.known) != (
            mode.multi_user,
            mode.known,
        ):
            _log_mode(upstream, mode, changed=previous is not None)
        return mode

    async def probe_all(self) -> None:
        """Probe every known instance once (at startup, for the log line)."""
        await asyncio.gather(*(self.probe(u) for u in self._pool.upstreams))

    async def _ask(self, upstream: Upstream) -> bool | None:
        headers = {hdrs.HOST: upstream.host_header, hdrs.ACCEPT_ENCODING: "identity"}
        try:
            async with self._pool.session.get(
                f"{upstream.base}/users",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS),
            ) as resp:
                if resp.status != 200 or hdrs.CONTENT_ENCODING in resp.headers:
                    return None
                answer = orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None
        if not isinstance(answer, dict):
            return None
        if isinstance(answer.get("users"), dict):
            return True
        if "migrated" in answer:
            return False
        return None


def _log_mode(upstream: Upstream, mode: UserMode, *, changed: bool) -> None:
    if mode.multi_user:
        log.info("comfyui_multi_user", upstream=upstream.name, changed=changed)
        return
    log.warning(
        "comfyui_single_user" if mode.known else "comfyui_user_mode_unknown",
        upstream=upstream.name,
        changed=changed,
        detail=(
            "ComfyUI runs without --multi-user (or its GET /users could not be read): all its "
            "users share one set of saved workflows, settings and user.css, so comfygate keeps "
            "each non-admin user's in a folder of their own (user/default/comfygate-users/) and "
            "serves their settings from there. Start ComfyUI with --multi-user to have it "
            "separate users itself."
        ),
    )
