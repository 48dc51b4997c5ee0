"""The one way the proxy reads a ComfyUI instance's queue for its own bookkeeping.

Used by the queue-quota reconciler and the generation-metrics watch: both need the ids
ComfyUI still lists as running or pending, and both must treat an unreadable answer as
"unknown", never as "empty" (that would end every prompt they track).
"""

from __future__ import annotations

from typing import Final

import aiohttp
import orjson
import structlog
from aiohttp import hdrs

from proxy.comfy.views import queue_ids
from proxy.errors import UpstreamError
from proxy.gc_tuning import collector_paused
from proxy.upstream.encoding import BACKGROUND_LIMIT, IDENTITY, read_client_answer
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.upstream.queue")

QUEUE_TIMEOUT_SECONDS: Final = 10.0
"""Bound on one ``GET /queue`` (its answer holds every queued graph: it can be large)."""


async def queued_ids(pool: UpstreamPool, upstream: Upstream, *, reader: str) -> set[str] | None:
    """The prompt ids ``upstream`` lists as running or pending; None when it cannot be read.

    ``reader`` names the caller in the warning logged when the queue cannot be read.
    """
    try:
        async with pool.session.get(
            upstream.url_for("/queue"),
            headers={hdrs.HOST: upstream.host_header, hdrs.ACCEPT_ENCODING: IDENTITY},
            timeout=aiohttp.ClientTimeout(total=QUEUE_TIMEOUT_SECONDS),
        ) as resp:
            status = resp.status
            body = await read_client_answer(
                resp, limit=BACKGROUND_LIMIT, upstream=upstream.name, metrics=pool.metrics
            )
    except (TimeoutError, aiohttp.ClientError, OSError, UpstreamError) as exc:
        log.warning(
            "queue_read_unreachable",
            reader=reader,
            upstream=upstream.name,
            error=type(exc).__name__,
        )
        return None
    if status != 200:
        log.warning("queue_read_refused", reader=reader, upstream=upstream.name, status=status)
        return None
    # The answer holds every queued graph (megabytes under load) and only the ids are kept:
    # parsed with the collector paused, so that it never scans the tree being built.
    with collector_paused():
        try:
            queue = orjson.loads(body)
        except orjson.JSONDecodeError:
            queue = None
        ids: set[str] | None = None
        if isinstance(queue, dict) and all(
            isinstance(queue.get(k), list) for k in ("queue_running", "queue_pending")
        ):
            ids = {*queue_ids(queue, "queue_running"), *queue_ids(queue, "queue_pending")}
        del queue  # freed before the collector is back
    if ids is not None:
        return ids
    # SECURITY: an answer we cannot read must not release every counted prompt.
    log.warning("queue_read_unexpected", reader=reader, upstream=upstream.name)
    return None


__all__ = ["QUEUE_TIMEOUT_SECONDS", "queued_ids"]
