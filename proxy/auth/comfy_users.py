"""ComfyUI users for ``--multi-user`` servers, created on first use.

ComfyUI mints user ids itself (``POST /users`` answers ``<name>_<uuid4>``), so the proxy keeps a
map from each principal's ``comfy_user`` name to the id ComfyUI chose: in Redis when configured
(shared by replicas), else in memory. An existing user is found by name in ``GET /users``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, web

from proxy.errors import UpstreamUnavailable
from proxy.upstream.encoding import BACKGROUND_LIMIT, IDENTITY, read_client_answer
from proxy.upstream.pool import UpstreamPool

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient

log = structlog.get_logger("comfygate.comfy_users")
KEY_PREFIX = "comfygate:comfy_user:"


class ComfyUserDirectory:
    """``comfy_user`` name -> ComfyUI user id on the upstream, creating the user once."""

    def __init__(self, pool: UpstreamPool, client: RedisClient | None) -> None:
        self._pool = pool
        self._redis = client
        self._ids: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def user_id(self, name: str) -> str:
        """The ComfyUI user id for ``name``.

        Raises:
            UpstreamUnavailable: ComfyUI could not be asked or refused to create the user.
        """
        upstream = self._pool.pick()
        key = f"{upstream.name}|{name}"
        if (known := self._ids.get(key)) is not None:
            return known
        async with self._lock:  # one creation per name, even under a burst of first requests
            if (known := self._ids.get(key)) is not None:
                return known
            if self._redis is not None:
                stored = await self._redis.get(KEY_PREFIX + key)
                if stored is not None:
                    self._ids[key] = stored.decode() if isinstance(stored, bytes) else stored
                    return self._ids[key]
            user_id = await self._find_or_create(upstream.base, upstream.host_header, name)
            if self._redis is not None:
                await self._redis.set(KEY_PREFIX + key, user_id)
            self._ids[key] = user_id
            log.info("comfy_user_ready", comfy_user=name, upstream=upstream.name)
            return user_id

    async def _find_or_create(self, base: str, host: str, name: str) -> str:
        session = self._pool.session
        headers = {
            hdrs.HOST: host,
            hdrs.CONTENT_TYPE: "application/json",
            hdrs.ACCEPT_ENCODING: IDENTITY,
        }
        try:
            async with session.get(f"{base}/users", headers=headers) as resp:
                raw = await read_client_answer(resp, limit=BACKGROUND_LIMIT, upstream=host)
                listing = orjson.loads(raw) if resp.status == 200 else {}
            for user_id, username in dict(listing.get("users") or {}).items():
                if username == name:
                    return str(user_id)
            body = orjson.dumps({"username": name})
            async with session.post(f"{base}/users", data=body, headers=headers) as resp:
                answer = orjson.loads(
                    await read_client_answer(resp, limit=BACKGROUND_LIMIT, upstream=host)
                )
                if resp.status != 200 or not isinstance(answer, str):
                    raise UpstreamUnavailable(
                        f"ComfyUI refused to create user {name!r} ({resp.status}); is it "
                        "running with --multi-user?"
                    )
                return answer
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise UpstreamUnavailable(
                f"ComfyUI user {name!r} could not be set up ({type(exc).__name__})"
            ) from None


COMFY_USERS = web.AppKey("comfygate.comfy_users", ComfyUserDirectory)
