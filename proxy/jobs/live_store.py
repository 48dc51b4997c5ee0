"""What the live event stream knows of running jobs: node, progress, latest preview.

Written by the replica whose watcher socket receives the job's events (:mod:`proxy.jobs.live`),
read by any replica (``GET /jobs/{id}`` progress, the SSE stream, ``GET /jobs/{id}/preview``):
in Redis when configured, else in process memory. Entries expire ``TTL_SECONDS`` after their
last change; nothing here decides who may read it (the API checks the job's owner first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

import orjson

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient

STATE_PREFIX: Final = "comfygate:joblive:"
PREVIEW_PREFIX: Final = "comfygate:jobpreview:"
TTL_SECONDS: Final = 6 * 3600.0
MAX_LOCAL: Final = 2048
"""Jobs kept in memory without Redis (the oldest forgotten first)."""


class LiveJobs:
    def __init__(self, client: RedisClient | None) -> None:
        self._redis = client
        self._local: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._previews: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()

    async def put(self, job_id: str, state: dict[str, Any]) -> None:
        """The job's whole live state (one writer per job: its watcher socket)."""
        if self._redis is not None:
            await self._redis.set(
                STATE_PREFIX + job_id, orjson.dumps(state), px=int(TTL_SECONDS * 1000)
            )
            return
        _keep(self._local, job_id, (time.time() + TTL_SECONDS, state))

    async def get(self, job_id: str) -> dict[str, Any] | None:
        if self._redis is not None:
            raw = await self._redis.get(STATE_PREFIX + job_id)
            if raw is None:
                return None
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None
            return data if isinstance(data, dict) else None
        known = self._local.get(job_id)
        return known[1] if known is not None and known[0] >= time.time() else None

    async def progress(self, job_id: str) -> dict[str, Any] | None:
        state = await self.get(job_id)
        progress = state.get("progress") if state is not None else None
        return progress if isinstance(progress, dict) else None

    async def put_preview(self, job_id: str, mime: str, image: bytes) -> None:
        if self._redis is not None:
            await self._redis.set(
                PREVIEW_PREFIX + job_id,
                mime.encode() + b"\0" + image,
                px=int(TTL_SECONDS * 1000),
            )
            return
        _keep(self._previews, job_id, (time.time() + TTL_SECONDS, mime, image))

    async def preview(self, job_id: str) -> tuple[str, bytes] | None:
        """``(content type, image)`` of the job's latest preview."""
        if self._redis is not None:
            raw = await self._redis.get(PREVIEW_PREFIX + job_id)
            if raw is None:
                return None
            data = raw if isinstance(raw, bytes) else str(raw).encode()
            mime, _, image = data.partition(b"\0")
            return mime.decode(), image
        known = self._previews.get(job_id)
        if known is None or known[0] < time.time():
            return None
        return known[1], known[2]


def _keep(store: OrderedDict[str, Any], key: str, value: Any) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > MAX_LOCAL:
        store.popitem(last=False)


__all__ = ["LiveJobs"]
