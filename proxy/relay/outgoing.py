"""What goes to ComfyUI for one request, and what its failures become: the request headers
(header policy, identity, the guards' headers) and the mapping of client errors to the proxy's
own (shared by the forward, the home instance's failover and the WebSocket relay)."""

from __future__ import annotations

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.observability.metrics import METRICS
from proxy.settings import SETTINGS
from proxy.state import HEADER_POLICY, RequestContext
from proxy.upstream.encoding import ask_identity
from proxy.upstream.headers import forwarded_values, strip_cookies, upstream_request_headers
from proxy.upstream.http1 import UpstreamConnectError, UpstreamHttpTimeout
from proxy.upstream.pool import POOL, Upstream


def build_upstream_headers(
    request: web.Request, ctx: RequestContext, upstream: Upstream
) -> CIMultiDict[str]:
    """Request headers for ComfyUI (see ``headers.upstream_request_headers``), with the header
    policy of the app (identity headers dropped, the proxy's cookies removed) and the headers
    the guards set for this request."""
    settings = request.app[SETTINGS]
    policy = request.app[HEADER_POLICY]
    server = settings.server
    forwarded_for, proto, fwd_host = forwarded_values(
        request.remote or "",
        request.headers,
        scheme=request.scheme,
        host=request.host,
        trusted=server.trusted_proxies,
    )
    preserve = settings.upstream.preserve_host
    host = request.host if preserve else upstream.host_header
    origin = f"{proto}://{request.host}" if preserve else upstream.origin
    headers = upstream_request_headers(
        request.headers,
        host=host,
        origin=origin,
        forwarded_for=forwarded_for,
        forwarded_proto=proto,
        forwarded_host=fwd_host,
        request_id=ctx.request_id,
        dropped=policy.dropped,
    )
    # Every Cookie header, not only the first aiohttp reads: a second one would otherwise
    # carry the session to ComfyUI. What is left goes as one header (RFC 6265 5.4).
    kept = [
        k
        for cookie in headers.popall(hdrs.COOKIE, ())
        if (k := strip_cookies(cookie, policy.dropped_cookies))
    ]
    if kept:
        headers[hdrs.COOKIE] = "; ".join(kept)
    headers.update(ctx.upstream_headers)
    if ctx.filters_response:
        # SECURITY: an answer the proxy filters is read, so it is asked for unencoded (a
        # compressed one used to pass unfiltered); what still comes encoded is decoded or refused.
        ask_identity(headers)
    return headers


def map_client_error(exc: BaseException, upstream: Upstream, request: web.Request) -> Exception:
    """Client errors -> the proxy's own tree (the one boundary where that happens)."""
    metrics = request.app[METRICS]
    if isinstance(exc, (TimeoutError, UpstreamHttpTimeout)):
        metrics.upstream_errors.labels(upstream.name, "timeout").inc()
        if isinstance(exc.__cause__, TimeoutError):  # connecting timed out (passive health)
            request.app[POOL].report_failure(upstream, "timeout")
        return UpstreamTimeout(f"ComfyUI at {upstream.name} did not answer in time")
    refused = isinstance(exc, (aiohttp.ClientConnectorError, UpstreamConnectError))
    kind = "refused" if refused else "protocol"
    metrics.upstream_errors.labels(upstream.name, kind).inc()
    if refused:  # nothing listens there (passive health); a broken exchange may be the client's
        request.app[POOL].report_failure(upstream, "refused")
    return UpstreamUnavailable(f"ComfyUI at {upstream.name} is unreachable ({type(exc).__name__})")
