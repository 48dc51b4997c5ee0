"""Running a ComfyUI request through the proxy's own chain, from inside a jobs API handler.

A job is a prompt: ``POST /jobs`` builds the ``POST /prompt`` body and hands it to the very
middleware chain a client's ``POST /api/prompt`` goes through (the request id and its log line,
error rendering, route resolution, CORS, idempotency, the guards of the ``prompt`` rule in
order - origin, auth, CSRF, role, rate limit, policy, body reading, idempotency, placement,
isolation, queue quota, and whatever else is wired on that rule - then the forward). Nothing
is re-implemented here, so nothing can drift: a job passes exactly the guards a prompt passes,
and is refused exactly as a prompt is. ``DELETE /jobs/{id}`` does the same with ComfyUI's own
cancel requests (``POST /queue`` delete, ``POST /interrupt``), judged by isolation's read guard.

The sub-request carries the caller's own credentials and origin headers (it is the caller's
request, made on their behalf), a body of the proxy's own making, and no ``Accept-Encoding``
(the answer is read here). Its response is never sent to the client's connection: it is read
and translated by the handler; a handler that tried to stream one gets an error instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.chain import REQUEST_ID_HEADER
from proxy.settings import SETTINGS
from proxy.state import CONTEXT, RequestContext

_DROPPED = frozenset(
    h.lower()
    for h in (
        hdrs.CONTENT_LENGTH,
        hdrs.CONTENT_TYPE,
        hdrs.CONTENT_ENCODING,
        hdrs.TRANSFER_ENCODING,
        hdrs.ACCEPT_ENCODING,
        hdrs.EXPECT,
        hdrs.UPGRADE,
        "Idempotency-Key",
        REQUEST_ID_HEADER,
    )
)


class _NoClientWrites(AbstractStreamWriter):
    """The sub-request's writer: its answer is read by the handler, never streamed to the
    client's connection (which carries the outer request's answer)."""

    buffer_size = 0
    output_size = 0
    length: int | None = 0

    async def write(self, chunk: Any) -> None:
        raise RuntimeError("an internal request cannot stream its answer")

    async def write_eof(self, chunk: bytes = b"") -> None:
        raise RuntimeError("an internal request cannot stream its answer")

    async def drain(self) -> None:
        return None

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        return None

    def enable_chunking(self) -> None:
        return None

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        raise RuntimeError("an internal request cannot stream its answer")

    def send_headers(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Answer:
    """What the chain answered the sub-request."""

    status: int
    body: bytes
    headers: CIMultiDictProxy[str]
    context: RequestContext
    """The sub-request's context (which instance it went to, who was authenticated)."""

    def json(self) -> Any:
        try:
            return orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return None


async def run_internal(
    request: web.Request,
    method: str,
    path: str,
    body: Mapping[str, Any] | None,
    *,
    idempotency_key: str | None = None,
) -> Answer:
    """Send ``method path`` with the JSON ``body`` through the app's whole chain as the caller.

    ``path`` is ComfyUI's (``/prompt``), sent as ``{base_path}/api{path}`` like the frontend.
    """
    app = request.app
    base = app[SETTINGS].server.base_path
    target = f"{base}/api{path}"
    raw = orjson.dumps(body) if body is not None else b""
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED
    )
    headers[hdrs.CONTENT_TYPE] = "application/json"
    headers[hdrs.CONTENT_LENGTH] = str(len(raw))
    outer = request.get(CONTEXT)
    if outer is not None:
        headers[REQUEST_ID_HEADER] = outer.request_id  # one id in the logs for both lines
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    url = URL(target)
    message = request._message._replace(
        method=method,
        url=url,
        path=target,
        headers=CIMultiDictProxy(headers),
        raw_headers=tuple((k.encode(), v.encode()) for k, v in headers.items()),
        chunked=False,
        compression=None,
    )
    protocol = request.protocol
    # The limit above the body's size: feeding it never pauses the client's connection.
    payload = StreamReader(
        protocol, limit=max(2**16, len(raw) + 1), loop=asyncio.get_running_loop()
    )
    if raw:
        payload.feed_data(raw)
    payload.feed_eof()
    inner = web.Request(
        message,
        payload,
        protocol,
        _NoClientWrites(),
        request.task,
        asyncio.get_running_loop(),
        client_max_size=request._client_max_size,
        state={},
        scheme=request.scheme,
        host=request.host,
        remote=request.remote,
    )
    response = await app._handle(inner)
    content = response.body if isinstance(response, web.Response) else None
    data = content if isinstance(content, bytes) else b""
    return Answer(response.status, data, CIMultiDictProxy(response.headers), inner[CONTEXT])


__all__ = ["Answer", "run_internal"]
