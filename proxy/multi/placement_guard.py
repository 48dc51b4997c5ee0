"""``PlacementGuard``: which instance runs a ``POST /prompt``, and its submission with failover.

Runs before isolation (which records the prompt under the chosen instance's name) on every
submission, admins' included, when there are several instances (or discovery). The decision
itself is :func:`proxy.multi.placement.decide`; here it meets the request:

- no instance could ever run the workflow: 400 in ComfyUI's shape, ``node_errors`` naming the
  missing node types and models per node (the stock UI marks those nodes);
- an instance could, but none able is healthy and undrained: 503 with ``Retry-After``;
- else ``ctx.target`` is the best candidate and ``ctx.failover`` a :class:`Submission`.

:class:`Submission` sends the body (read whole by the guards) to the target; if the instance
refuses the connection (or it times out connecting) or answers 5xx, nothing was queued there,
and the same bytes (the same ``prompt_id``: isolation always sets one) go to the next candidate,
up to ``upstream.placement.max_attempts`` instances. The ownership record and the queue-quota
reservation are moved to the next instance before the bytes go there (ComfyUI may send events
before it answers; the per-upstream cap and gauge count where the prompt is queued).
A failure after the request was sent (a read timeout, a reset mid-answer) is *not* retried: the
prompt may be queued there, and a second copy would run twice.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import orjson
import structlog
from aiohttp import hdrs, web

from proxy.comfy.records import FileRef
from proxy.errors import Rejection
from proxy.limits.quota.move import move_reservation
from proxy.limits.quota.service import QUEUE_QUOTA
from proxy.multi.placement import (
    CandidateState,
    Missing,
    Requirements,
    decide,
    describe,
    node_errors,
    requirements,
)
from proxy.multi.replication import FileCopier, referenced_files
from proxy.observability.metrics import METRICS, Metrics
from proxy.redis.client import REDIS
from proxy.relay.outgoing import build_upstream_headers, map_client_error
from proxy.request.prompt import read_prompt
from proxy.settings.upstreams import PlacementSettings
from proxy.state import CONTEXT, Body, RequestContext
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.http1 import (
    UpstreamConnectError,
    UpstreamHttpError,
    UpstreamHttpTimeout,
    UpstreamResponse,
)
from proxy.upstream.pool import POOL, Upstream, UpstreamPool, unavailable

log = structlog.get_logger("comfygate.upstream.placement")


class PlacementRejected(Rejection):
    """No instance has every node type and model the workflow names (ComfyUI's 400 shape)."""

    status = 400
    error_type = "no_capable_instance"

    def __init__(self, missing: dict[str, tuple[Missing, ...]]) -> None:
        errors = node_errors(missing)
        items = sorted({describe(m) for ms in missing.values() for m in ms})
        shown = ", ".join(items[:5]) + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")
        super().__init__(
            f"No ComfyUI instance can run this workflow: missing {shown}",
            details="; ".join(
                f"{name} lacks {', '.join(describe(m) for m in ms)}"
                for name, ms in sorted(missing.items())
            ),
        )
        self.node_errors = errors


def candidate_states(pool: UpstreamPool) -> list[CandidateState]:
    """The registry as placement sees it, now."""
    routable = {u.name for u in pool.routable()}
    return [
        CandidateState(
            name=i.upstream.name,
            routable=i.upstream.name in routable,
            capabilities=i.capabilities,
            outstanding=i.outstanding,
            weight=i.upstream.weight,
            last_checkpoints=i.last_checkpoints,
            order=i.order,
        )
        for i in pool.instances()
    ]


class PlacementGuard:
    """See the module docstring."""

    name = "placement"

    def __init__(self, pool: UpstreamPool, metrics: Metrics, settings: PlacementSettings) -> None:
        self._pool = pool
        self._metrics = metrics
        self._settings = settings

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        pool = self._pool
        if request.method != hdrs.METH_POST or ctx.path != "/prompt" or not pool.managed:
            return  # one instance: it gets everything, as before
        graph = (await read_prompt(request, ctx)).prompt  # the proxy's one reading of it
        if graph is None:
            # ComfyUI refuses it (no_prompt) whichever instance gets it: no decision to make.
            routable = pool.routable()
            ctx.target = routable[0] if routable else pool.home()
            return
        metrics = self._metrics
        started = time.perf_counter()
        req = requirements(graph)
        decision = decide(req, candidate_states(pool))
        metrics.placement_duration.observe(time.perf_counter() - started)
        if decision.outcome == "no_healthy_instance":
            metrics.placements.labels("no_healthy_instance").inc()
            raise unavailable(
                "No healthy ComfyUI instance can run this prompt now; try again shortly",
                "no_healthy_instance",
                retry_after=pool.retry_after(),
            )
        if decision.outcome == "no_capable_instance":
            metrics.placements.labels("no_capable_instance").inc()
            raise PlacementRejected(dict(decision.missing))
        ranked = [u for c in decision.ranked if (u := pool.get(c.name)) is not None]
        metrics.placements.labels("placed").inc()
        ctx.target = ranked[0]
        settings = self._settings
        ctx.failover = Submission(
            ranked[: settings.max_attempts],
            req,
            referenced_files(graph) if settings.copy_inputs else [],
        )


class Submission:
    """One placed ``POST /prompt`` (see the module docstring)."""

    def __init__(
        self, candidates: Sequence[Upstream], req: Requirements, files: Sequence[FileRef]
    ) -> None:
        self.candidates = tuple(candidates)
        self.requirements = req
        self.files = tuple(files)

    async def send(
        self, request: web.Request, first: Upstream, body: Body
    ) -> tuple[UpstreamResponse, Upstream]:
        pool = request.app[POOL]
        order = [first, *(u for u in self.candidates if u.name != first.name)]
        if not isinstance(body, bytes):
            order = order[:1]  # a streamed body cannot be sent twice
        order = order[: max(1, len(self.candidates))]
        copier = FileCopier(pool, request.app[METRICS])
        failure: tuple[BaseException, Upstream] | None = None
        for attempt, upstream in enumerate(order):
            last = attempt == len(order) - 1
            if attempt:
                await self._moved(request, order[attempt - 1], upstream, body)
                ctx = request[CONTEXT]
                ctx.target = upstream  # what later readers of the answer see (lost-prompt watch)
                ctx.upstream = upstream.name
            if self.files:
                await copier.ensure(self.files, upstream)
            try:
                resp = await pool.http1(upstream).request(
                    hdrs.METH_POST,
                    upstream.target_prefix + request[CONTEXT].upstream_path,
                    _headers(request, upstream, body),
                    body,
                )
            except (UpstreamConnectError, UpstreamHttpTimeout) as exc:
                if not _before_sending(exc):
                    raise map_client_error(exc, upstream, request) from None
                failure = (exc, upstream)
                kind = "refused" if isinstance(exc, UpstreamConnectError) else "timeout"
                request.app[METRICS].upstream_errors.labels(upstream.name, kind).inc()
                pool.report_failure(upstream, "refused")  # nothing listens there
                log.warning("submission_refused", upstream=upstream.name, error=kind)
                continue
            except (UpstreamHttpError, TimeoutError, OSError) as exc:
                # Sent, then lost: it may be queued there. Never sent twice.
                raise map_client_error(exc, upstream, request) from None
            pool.report_response(upstream, resp.status)
            if resp.status >= 500 and not last:
                log.warning("submission_failed", upstream=upstream.name, status=resp.status)
                resp.close()  # its error page is not read: the connection is dropped
                continue
            if resp.status == 200:
                pool.note_submitted(upstream.name, self.requirements.checkpoints)
            return resp, upstream
        assert failure is not None
        raise map_client_error(failure[0], failure[1], request)

    async def _moved(
        self, request: web.Request, failed: Upstream, upstream: Upstream, body: Body
    ) -> None:
        """The prompt goes to ``upstream`` now: its ownership record and its queue-quota
        reservation say so first."""
        request.app[METRICS].placements.labels("moved").inc()
        log.info("submission_moved", from_upstream=failed.name, to_upstream=upstream.name)
        prompt_id = _prompt_id(body)
        if prompt_id is None:
            return
        if (quota := request.app.get(QUEUE_QUOTA)) is not None:
            await move_reservation(quota, request.app[REDIS], prompt_id, upstream.name)
        store = request.app[OWNERSHIP]
        record = await store.prompt(prompt_id)
        if record is None or record.upstream == upstream.name:
            return
        # Forget, then record again: the store only creates records (its ids are unique), and
        # no event of this prompt can arrive in between (no instance has it yet).
        await store.forget_prompt(prompt_id)
        await store.record_prompt(dataclasses.replace(record, upstream=upstream.name))


def _before_sending(exc: BaseException) -> bool:
    """Whether the request certainly never reached ComfyUI: the connection was refused, or
    connecting timed out (``Http1Pool._connect`` raises those with the TimeoutError as cause;
    a read timeout has none)."""
    if isinstance(exc, UpstreamConnectError):
        return True
    return isinstance(exc, UpstreamHttpTimeout) and isinstance(exc.__cause__, TimeoutError)


def _headers(request: web.Request, upstream: Upstream, body: Body) -> list[tuple[str, str]]:
    """What ``forward_http`` sends, for ``upstream`` (Host and Origin differ per instance)."""
    headers = build_upstream_headers(request, request[CONTEXT], upstream)
    headers.pop(hdrs.EXPECT, None)
    if isinstance(body, bytes):
        headers.popall(hdrs.TRANSFER_ENCODING, None)
        headers.popall(hdrs.CONTENT_ENCODING, None)  # the guards' copy is decoded
        headers[hdrs.CONTENT_LENGTH] = str(len(body))
    else:
        headers.popall(hdrs.CONTENT_LENGTH, None)
    return list(headers.items())


def _prompt_id(body: Body) -> str | None:
    if not isinstance(body, bytes):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = data.get("prompt_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
