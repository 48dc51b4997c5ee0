"""The result cache (opt-in per template): the same canonical workflow, seed included, gets
the earlier job's outputs instead of running again.

The key is a hash of the filled workflow as the proxy serialises it (sorted keys, so two
spellings of one graph are one key), the template's name and, with ``scope = "user"``, the
owner: one user's cached result is never another's unless the template says ``shared``. Only
a job that *succeeded* is stored (seen ending by a waiting ``POST /jobs?wait=``); the entry
lives ``ttl_seconds``. A hit is a new job (its own id, marked ``cache.hit`` with the source
job) that queued nothing.

Shared scope means every user allowed the template may fetch the source job's output files
(the source job's owner's outputs are read for them); that is what "shared" asks for, and it
is only ever a template's decision, never a client's.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import orjson

from proxy.jobs.templates import Template

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient

KEY_PREFIX = "comfygate:jobcache:"
MAX_LOCAL = 50_000


def cache_key(template: Template, workflow: dict[str, Any], owner: str, *, isolated: bool) -> str:
    """The entry's key. With isolation on, ``shared`` is per user too: another user could not
    read the earlier job's files (``/view`` keeps every user to their own), so sharing them
    would hand out results nobody can fetch; default deny wins over the template's wish."""
    assert template.cache is not None
    shared = template.cache.scope == "shared" and not isolated
    scope = "*shared*" if shared else owner
    canonical = orjson.dumps(workflow, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(
        template.name.encode() + b"\0" + scope.encode() + b"\0" + canonical
    ).hexdigest()
    return digest


class ResultCache:
    """In Redis when configured (every replica shares hits), else in process memory."""

    def __init__(self, client: RedisClient | None) -> None:
        self._redis = client
        self._local: OrderedDict[str, tuple[float, str, str]] = OrderedDict()

    async def lookup(self, key: str) -> tuple[str, str] | None:
        """``(job id, upstream)`` of the earlier job, or None."""
        if self._redis is not None:
            raw = await self._redis.get(KEY_PREFIX + key)
            if raw is None:
                return None
            data = orjson.loads(raw)
            return str(data["job"]), str(data["upstream"])
        known = self._local.get(key)
        if known is None or known[0] < time.time():
            return None
        return known[1], known[2]

    async def store(self, key: str, job_id: str, upstream: str, ttl: float) -> None:
        if self._redis is not None:
            value = orjson.dumps({"job": job_id, "upstream": upstream})
            # NX: the first result stays the one every later hit returns, for its whole TTL.
            await self._redis.set(KEY_PREFIX + key, value, px=max(1, int(ttl * 1000)), nx=True)
            return
        if key in self._local and self._local[key][0] >= time.time():
            return
        self._local[key] = (time.time() + ttl, job_id, upstream)
        while len(self._local) > MAX_LOCAL:
            self._local.popitem(last=False)


__all__ = ["ResultCache", "cache_key"]
