"""The queue quota's own guards, on the ``ws`` and ``prompt`` rules.

- :class:`SocketQuotaGuard` (``ws``, before isolation): puts a
  :class:`~proxy.limits.quota.reconciler.QuotaEventObserver` first in the socket's frame
  filters, so prompt ends seen on the relay free their slots at once (also those isolation
  does not pass on to this client).
- :class:`QueueQuotaGuard` (``POST /prompt``, last; wired only with ``isolation.enabled =
  false``): reserves the slot itself (with isolation on, the isolation guard does it once it
  has rewritten the submission). The prompt id is the client's when it sent one (as ComfyUI
  would use it), else one minted here and added to the body, so that the prompt's end can be
  recognised.
"""

from __future__ import annotations

import uuid

from aiohttp import hdrs, web

from proxy.limits.quota.reconciler import QuotaEventObserver
from proxy.limits.quota.service import QueueQuota
from proxy.request.prompt import forward_submission, read_prompt
from proxy.request.websocket import is_websocket
from proxy.state import RequestContext
from proxy.upstream.pool import UpstreamPool


class SocketQuotaGuard:
    """See the module doc. Does nothing while quotas are off or for principals not counted."""

    name = "queue_quota"

    def __init__(self, quota: QueueQuota) -> None:
        self._quota = quota

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is not None and self._quota.tracks(principal) and is_websocket(request):
            ctx.frame_filters.append(QuotaEventObserver(self._quota))


class QueueQuotaGuard:
    """See the module doc. Does nothing while quotas are off or for principals not counted."""

    name = "queue_quota"

    def __init__(self, quota: QueueQuota, pool: UpstreamPool) -> None:
        self._quota = quota
        self._pool = pool

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is None or not self._quota.tracks(principal):
            return
        if request.method == hdrs.METH_POST:
            prompt_id = await _prompt_id(request, ctx)
            if prompt_id is not None:
                upstream = ctx.target or self._pool.pick()
                await self._quota.reserve(ctx, principal, prompt_id, upstream.name)


async def _prompt_id(request: web.Request, ctx: RequestContext) -> str | None:
    """The id ComfyUI will give the submission (one added to the body if it has none); None
    when the body has no prompt (ComfyUI refuses it: nothing to count)."""
    submission = await read_prompt(request, ctx)  # the proxy's one reading of the body
    if submission.prompt is None:
        return None
    prompt_id = submission.body.get("prompt_id")
    if isinstance(prompt_id, str) and prompt_id:
        return prompt_id  # ComfyUI uses the client's (str()) id as it is
    prompt_id = str(uuid.uuid4())
    submission.body["prompt_id"] = prompt_id
    forward_submission(ctx, submission)
    return prompt_id


__all__ = ["QueueQuotaGuard", "SocketQuotaGuard"]
