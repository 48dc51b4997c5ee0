"""``forward_http``: the terminal handler that sends a request to ComfyUI and streams the answer.

Bodies stream in both directions. Only small bodies with a known length are read whole (one
write instead of many; bounded by :data:`SMALL_BODY`), so a 100 MB upload or a 200 MB video
passes with flat memory.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict

from proxy.errors import BadRequest, UpstreamUnavailable
from proxy.observability.metrics import METRICS
from proxy.relay.home import home_for, read_failover
from proxy.relay.outgoing import build_upstream_headers, map_client_error
from proxy.settings import SETTINGS
from proxy.state import CONTEXT, RequestContext
from proxy.upstream.encoding import compress_for_client, decode
from proxy.upstream.headers import (
    client_response_headers,
)
from proxy.upstream.http1 import (
    UpstreamHttpError,
    UpstreamResponse,
)
from proxy.upstream.pool import POOL, Upstream

log = structlog.get_logger("comfygate.forward")

SMALL_BODY = 256 * 1024
"""Bodies up to this size with a declared length are read whole; larger ones stream."""
CHUNK = 256 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


async def _stream_request_body(request: web.Request, ctx: RequestContext) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        ctx.bytes_in += len(chunk)
        yield chunk


_CLIENT_ERRORS = (UpstreamHttpError, TimeoutError, OSError)


async def forward_http(request: web.Request) -> web.StreamResponse:
    """Send the request to ComfyUI and relay its answer."""
    ctx = request[CONTEXT]
    pool = request.app[POOL]
    upstream = ctx.target or home_for(request)  # home, or a stand-in while it is down
    ctx.upstream = upstream.name
    headers = build_upstream_headers(request, ctx, upstream)
    # We send the body at once and skip 1xx answers: no "100 Continue" handshake upstream.
    headers.pop(hdrs.EXPECT, None)

    body: bytes | AsyncIterator[bytes] | None = ctx.body
    if hdrs.CONTENT_ENCODING in request.headers and body is None:
        # aiohttp's server already decoded a gzip/deflate request body: forward the decoded
        # bytes as such (the original length and encoding no longer describe them).
        headers.popall(hdrs.CONTENT_ENCODING, None)
        headers.popall(hdrs.CONTENT_LENGTH, None)
        body = ctx.body_stream or _stream_request_body(request, ctx)
    elif ctx.body_stream is not None:
        body = ctx.body_stream
        headers.popall(hdrs.CONTENT_LENGTH, None)  # the rewritten body's length is unknown
    elif body is None and request.body_exists:
        length = request.content_length
        if length is not None and length <= SMALL_BODY:
            body = await request.content.readexactly(length) if length else b""
            ctx.bytes_in = length
        else:
            body = _stream_request_body(request, ctx)
    if isinstance(body, bytes):
        headers.popall(hdrs.TRANSFER_ENCODING, None)
        headers[hdrs.CONTENT_LENGTH] = str(len(body))

    method = request.method
    if method == hdrs.METH_HEAD and ctx.filters_response:
        # SECURITY: HEAD is answered as the filtered GET would be (same status, headers and
        # length): ComfyUI's own HEAD would announce the unfiltered body's length.
        method = hdrs.METH_GET
    started = time.perf_counter()
    # Placement: a refused submission moves to another instance; a read of the home
    # instance's that any instance answers alike moves too (proxy.relay.home).
    failover = ctx.failover or read_failover(request, body)
    try:
        if failover is not None:
            resp, upstream = await failover.send(request, upstream, body)
        else:
            resp = await pool.http1(upstream).request(
                method,
                upstream.target_prefix + ctx.upstream_path,
                list(headers.items()),
                body,
            )
            pool.report_response(upstream, resp.status)  # passive health (several instances)
    except _CLIENT_ERRORS as exc:
        ctx.upstream_seconds = time.perf_counter() - started
        log.warning(
            "upstream_failed",
            request_id=ctx.request_id,
            upstream=upstream.name,
            error=type(exc).__name__,
        )
        raise map_client_error(exc, upstream, request) from None
    except ValueError as exc:  # the request cannot be framed as HTTP/1.1 (refused before I/O)
        raise BadRequest(f"request cannot be forwarded: {exc}") from None
    ctx.upstream_seconds = time.perf_counter() - started
    try:
        return await _relay_response(request, ctx, resp, upstream)
    finally:
        resp.release()  # back to the pool when fully read, else the connection is closed


async def _relay_response(
    request: web.Request,
    ctx: RequestContext,
    resp: UpstreamResponse,
    upstream: Upstream,
) -> web.StreamResponse:
    headers = client_response_headers(resp.headers)
    length = resp.content_length
    if ctx.filters_response and resp.status not in _NO_BODY_STATUSES:
        # Whatever its content type or encoding: a filtered answer is never passed unread.
        return await _rewritten_response(request, ctx, resp, upstream, headers)
    no_body = request.method == hdrs.METH_HEAD or resp.status in _NO_BODY_STATUSES
    if not no_body and length is not None and length <= SMALL_BODY:
        payload = await _read_all(request, ctx, resp, upstream, limit=SMALL_BODY)
        ctx.bytes_out = len(payload)
        return web.Response(status=resp.status, reason=resp.reason, headers=headers, body=payload)
    return await _streamed_response(request, ctx, resp, upstream, headers, no_body=no_body)


async def _read_all(
    request: web.Request,
    ctx: RequestContext,
    resp: UpstreamResponse,
    upstream: Upstream,
    *,
    limit: int,
) -> bytes:
    """The whole body, at most ``limit`` bytes.

    Raises:
        UpstreamUnavailable: the body is larger, or the connection broke.
        UpstreamTimeout: the upstream went silent.
    """
    started = time.perf_counter()
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await resp.read_chunk():
            size += len(chunk)
            if size > limit:
                raise UpstreamUnavailable("ComfyUI's answer is too large to inspect")
            chunks.append(chunk)
    except _CLIENT_ERRORS as exc:
        raise map_client_error(exc, upstream, request) from None
    finally:
        ctx.upstream_seconds += time.perf_counter() - started
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _rewritten_response(
    request: web.Request,
    ctx: RequestContext,
    resp: UpstreamResponse,
    upstream: Upstream,
    headers: CIMultiDict[str],
) -> web.Response:
    """The answer read whole, decoded (see ``proxy.upstream.encoding``), rewritten, and sent as
    the proxy's own body: gzip-compressed when the client accepts it. For a client's HEAD the
    upstream request was a GET: the same response, its body left out by aiohttp."""
    limit = int(request.app[SETTINGS].server.max_inspected_body_mb * 1024 * 1024)
    raw = await _read_all(request, ctx, resp, upstream, limit=limit)
    payload = decode(
        raw, resp.headers, limit=limit, upstream=upstream.name, metrics=request.app[METRICS]
    )
    body = await ctx.filter_response(resp.status, payload)
    headers.popall(hdrs.CONTENT_ENCODING, None)  # the body is the proxy's own, unencoded
    ctx.bytes_out = 0 if request.method == hdrs.METH_HEAD else len(body)
    response = web.Response(status=resp.status, reason=resp.reason, headers=headers, body=body)
    compress_for_client(request, response)
    return response


async def _streamed_response(
    request: web.Request,
    ctx: RequestContext,
    resp: UpstreamResponse,
    upstream: Upstream,
    headers: CIMultiDict[str],
    *,
    no_body: bool,
) -> web.StreamResponse:
    length = resp.content_length
    response = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
    if length is not None:
        response.content_length = length  # keep upstream's framing (and HEAD's announced size)
    await response.prepare(request)
    if no_body:
        await response.write_eof()
        return response
    while True:
        started = time.perf_counter()
        try:
            chunk = await resp.read_chunk()
        except _CLIENT_ERRORS as exc:
            # Headers are out: the only honest signal left is a truncated body.
            ctx.upstream_seconds += time.perf_counter() - started
            map_client_error(exc, upstream, request)
            log.warning(
                "upstream_stream_broken",
                request_id=ctx.request_id,
                upstream=upstream.name,
                error=type(exc).__name__,
                bytes_sent=ctx.bytes_out,
            )
            ctx.error_type = "upstream_stream_broken"
            if request.transport is not None:
                request.transport.close()
            resp.close()
            return response
        ctx.upstream_seconds += time.perf_counter() - started
        if not chunk:
            break
        ctx.bytes_out += len(chunk)
        await response.write(chunk)
    await response.write_eof()
    return response
