"""Routes of the home instance while it is down (issue 14, finding 5).

With several instances, what no guard routes elsewhere (``ctx.target``) goes to the home
instance (``pool.home()``). While the home instance is down (its breaker is not closed),
that used to be a 502 although other instances were up; now it depends on what is asked:

* **Read-only answers any instance gives alike** go to another reachable instance, and a
  connection the home instance refuses before anything was sent is retried on the next
  reachable one (:class:`ReadFailover`): ``GET``/``HEAD`` of the rules in
  :data:`FAILOVER_RULES`: ``/system_stats`` and ``/features`` (the frontend calls them on
  load), model lists (``/models``, ``/embeddings``, ``/experiment/models``), ``/object_info``
  (the lists and the node catalog are already merged over the reachable instances; this is
  for the parts that are not), and the frontend's static files (``/``, ``/extensions``,
  ``/templates``, ``/scripts``, ``/assets``, ``/docs``). Instances run the same ComfyUI and
  frontend, so another instance's answer is the one the home instance would give, save for
  its own hardware in ``/system_stats``.
* **State on the home instance's disk** (:data:`HOME_ONLY_RULES`: settings, user data,
  ``user.css``) is never read from or written to another instance: a user's files are not
  there, and a write would land where nobody reads it later. While the home instance is down
  those answer 503 ``home_unavailable`` with ``Retry-After`` (the next health check), a clear
  message instead of a 502.
* Everything else (uploads, ``/free``, custom nodes' routes...) is unchanged: the home
  instance, or its failure.

Each request moved to another instance is counted in
``comfygate_home_failovers_total{rule}``. One instance (no pool management): none of this runs.
"""

from __future__ import annotations

import structlog
from aiohttp import hdrs, web

from proxy.errors import ServiceUnavailable
from proxy.observability.metrics import METRICS
from proxy.relay.outgoing import build_upstream_headers, map_client_error
from proxy.state import CONTEXT, Body
from proxy.upstream.http1 import UpstreamConnectError, UpstreamHttpTimeout, UpstreamResponse
from proxy.upstream.pool import POOL, Upstream, UpstreamPool, unavailable

log = structlog.get_logger("comfygate.upstream")

FAILOVER_RULES = frozenset({"system_stats", "models", "object_info", "static"})
"""Route rules (``proxy.routes``) whose reads another instance answers while home is down."""
HOME_ONLY_RULES = frozenset({"settings", "userdata"})
"""Route rules whose state is on the home instance's disk: 503 while it is down."""
_READS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})


def home_for(request: web.Request) -> Upstream:
    """The instance a request no guard routed goes to: home, or (see the module doc) another
    one while home is down.

    Raises:
        ServiceUnavailable: home is down and the request is for its own state (503
            ``home_unavailable``), or no instance is known yet (``no_upstream``).
    """
    pool = request.app[POOL]
    home = pool.home()
    if not pool.managed or pool.is_healthy(home.name):
        return home
    rule = request[CONTEXT].rule.name
    if rule in HOME_ONLY_RULES:
        raise home_unavailable(pool, home)
    if rule in FAILOVER_RULES and request.method in _READS:
        for other in pool.reachable():
            request.app[METRICS].home_failovers.labels(rule).inc()
            return other
    return home  # nothing else is up: home it is (a 502 if it is still down)


def home_unavailable(pool: UpstreamPool, home: Upstream) -> ServiceUnavailable:
    retry_after = max(1, round(pool.settings.health.interval_seconds))
    return unavailable(
        f"The home ComfyUI instance ({home.name}), which keeps settings and user data, is "
        "unavailable; try again shortly",
        "home_unavailable",
        retry_after=retry_after,
    )


def read_failover(request: web.Request, body: Body) -> ReadFailover | None:
    """A :class:`ReadFailover` for a read that ``forward_http`` sends to the home instance
    (or its stand-in), when other instances could take it; None otherwise (cheap: one
    instance, a guard's target, a write, another rule)."""
    ctx = request[CONTEXT]
    if ctx.target is not None or ctx.failover is not None:
        return None
    pool = request.app[POOL]
    if (
        not pool.managed
        or request.method not in _READS
        or ctx.rule.name not in FAILOVER_RULES
        or not (body is None or isinstance(body, bytes))
    ):
        return None
    return ReadFailover()


class ReadFailover:
    """Sends a read to its instance and, if that one refused the connection (nothing was
    sent), to the next reachable instances (``ctx.failover`` for ``forward_http``)."""

    async def send(
        self, request: web.Request, first: Upstream, body: Body
    ) -> tuple[UpstreamResponse, Upstream]:
        pool = request.app[POOL]
        ctx = request[CONTEXT]
        order = [first, *(u for u in pool.reachable() if u.name != first.name)]
        method = request.method
        if method == hdrs.METH_HEAD and ctx.filters_response:
            method = hdrs.METH_GET  # as forward_http asks: the filtered GET's answer
        for attempt, upstream in enumerate(order):
            headers = build_upstream_headers(request, ctx, upstream)
            headers.pop(hdrs.EXPECT, None)
            if isinstance(body, bytes):
                headers.popall(hdrs.TRANSFER_ENCODING, None)
                headers[hdrs.CONTENT_LENGTH] = str(len(body))
            try:
                resp = await pool.http1(upstream).request(
                    method, upstream.target_prefix + ctx.upstream_path, list(headers.items()), body
                )
            except (UpstreamConnectError, UpstreamHttpTimeout) as exc:
                # Counted and reported to passive health like any failure, under its own name.
                error = map_client_error(exc, upstream, request)
                if attempt == len(order) - 1 or not _before_sending(exc):
                    raise error from None
                request.app[METRICS].home_failovers.labels(ctx.rule.name).inc()
                log.info(
                    "home_read_moved",
                    request_id=ctx.request_id,
                    from_upstream=upstream.name,
                    to_upstream=order[attempt + 1].name,
                )
                continue
            pool.report_response(upstream, resp.status)
            ctx.upstream = upstream.name
            return resp, upstream
        raise AssertionError("unreachable: the last attempt returns or raises")


def _before_sending(exc: BaseException) -> bool:
    """Whether the request certainly never reached ComfyUI: refused, or connecting timed out
    (``Http1Pool`` raises that with the TimeoutError as cause; a read timeout has none)."""
    if isinstance(exc, UpstreamConnectError):
        return True
    return isinstance(exc, UpstreamHttpTimeout) and isinstance(exc.__cause__, TimeoutError)


__all__ = ["FAILOVER_RULES", "HOME_ONLY_RULES", "ReadFailover", "home_for", "read_failover"]
