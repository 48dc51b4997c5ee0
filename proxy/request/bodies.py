"""Inspected request bodies: read once, bounded in memory, refused when they cannot be read.

The proxy reads (buffers) the JSON body of a few routes to decide on it - the *inspected*
routes, :func:`inspected_rule`::

    POST /prompt   POST /queue   POST /history   POST /interrupt   POST /api/jobs/cancel

Every other body streams to ComfyUI as it comes (uploads, user data...).

Memory. One body is at most ``server.max_inspected_body_mb`` (413 beyond). The bytes held at
once are bounded per process (``server.max_inspected_bytes_in_flight_mb``: 503 + Retry-After)
and per principal (``server.max_inspected_bytes_per_principal_mb``: 429 + Retry-After; the
principal's own concurrency, checked first). A body is accounted before any of it is read
when it has a Content-Length, chunk by chunk as it arrives when chunked, and for its canonical
form when that is larger; everything is given back when the request ends, however it ends
(:func:`release_inspected_bodies`). Bytes of the body, not of the objects parsed from it: the
bound is a proxy for memory, tight enough that ten clients cannot make the process hold
gigabytes. Each worker process has its own bound.

Reading: one rule, :func:`read_json_body`, whichever guard reads the body first (the
:class:`BodyGuard` makes sure one does on every inspected route, whatever else is enabled);
``POST /prompt`` is read by :func:`proxy.request.prompt.read_prompt` instead (the same
:func:`read_json_body`, then the prompt model on the parsed body).
ComfyUI reads these bodies with ``await request.json()``; the proxy reads them the same way
(:func:`proxy.comfy.json_body.parse_json`, strictly: what two readers could read apart is
refused too) and refuses, with 400 in ComfyUI's error shape
(``node_errors`` and type ``invalid_prompt`` on ``/prompt``, type ``invalid_body`` elsewhere)
and before anything reaches ComfyUI, what it cannot read or what ComfyUI would fail on: a
``Content-Encoding`` (the proxy decides on no compressed body), a charset Python cannot decode
text with, a body that is not JSON, or one whose top level is not an object (ComfyUI answers a
500 to all of those). On ``/interrupt`` an empty body is ComfyUI's "stop what runs" and reads
as ``{}``.

Canonical form: once read, ``ctx.body`` is the proxy's own UTF-8 serialisation of what it
parsed (sent with ``Content-Type: application/json``), the form every later guard decides on and
ComfyUI receives; ``ctx.parsed_body`` caches the parse for those guards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from proxy.comfy.json_body import JsonRefused, dump_json, parse_json
from proxy.comfy.json_fast import parse_canonical
from proxy.errors import BadRequest, PayloadTooLarge, RateLimited, Rejection, ServiceUnavailable
from proxy.observability.metrics import METRICS, Metrics
from proxy.settings import SETTINGS, ServerSettings
from proxy.state import RequestContext

log = structlog.get_logger("comfygate.bodies")

MB: Final = 1024 * 1024
RETRY_AFTER_SECONDS: Final = 1
"""An inspected body is held for one round trip to ComfyUI: capacity comes back quickly."""
PROCESS_BOUND: Final = "process_bound"
PRINCIPAL_BOUND: Final = "principal_bound"


@dataclass(frozen=True, slots=True)
class BodyRule:
    """How one inspected route's body must read."""

    error_type: str
    """``error.type`` of a refusal: ComfyUI's ``invalid_prompt`` on ``/prompt``."""
    empty_is_object: bool = False
    """An empty body reads as ``{}`` (``/interrupt``: ComfyUI catches the decode error)."""


PROMPT_BODY: Final = BodyRule("invalid_prompt")
OBJECT_BODY: Final = BodyRule("invalid_body")
INTERRUPT_BODY: Final = BodyRule("invalid_body", empty_is_object=True)
INSPECTED_RULES: Final = ("prompt", "queue", "history", "interrupt", "jobs")
"""Route rules with an inspected route (``jobs``: only ``POST /api/jobs/cancel``)."""


def inspected_rule(method: str, ctx: RequestContext) -> BodyRule | None:
    """How the request's body must read if the proxy inspects it; None: it streams through."""
    if method != hdrs.METH_POST:
        return None
    rule = ctx.rule.name
    if rule == "prompt":
        return PROMPT_BODY
    if rule in ("queue", "history"):
        return OBJECT_BODY
    if rule == "interrupt":
        return INTERRUPT_BODY
    if rule == "jobs" and ctx.path == "/jobs/cancel":
        return OBJECT_BODY
    return None


# -- the bound ---------------------------------------------------------------------------------


class BodyBudget:
    """Bytes of inspected bodies held by this process, in total and per principal."""

    def __init__(self, *, total: int, per_principal: int, metrics: Metrics) -> None:
        self.total = total
        self.per_principal = per_principal
        self.in_flight = 0
        self.peak = 0
        """The highest ``in_flight`` seen: never above ``total``."""
        self._held: dict[str, int] = {}
        self._gauge = metrics.inspected_bytes

    @classmethod
    def from_settings(cls, server: ServerSettings, metrics: Metrics) -> BodyBudget:
        return cls(
            total=int(server.max_inspected_bytes_in_flight_mb * MB),
            per_principal=int(server.max_inspected_bytes_per_principal_mb * MB),
            metrics=metrics,
        )

    def held_by(self, who: str) -> int:
        return self._held.get(who, 0)

    def take(self, who: str, size: int) -> str | None:
        """Hold ``size`` more bytes for ``who``; the bound it would pass instead (nothing held).

        Synchronous: no other request runs between the check and the update.
        """
        held = self._held.get(who, 0)
        if held + size > self.per_principal:
            return PRINCIPAL_BOUND
        if self.in_flight + size > self.total:
            return PROCESS_BOUND
        self._held[who] = held + size
        self.in_flight += size
        self.peak = max(self.peak, self.in_flight)
        self._gauge.set(self.in_flight)
        return None

    def give_back(self, who: str, size: int) -> None:
        left = self._held.get(who, 0) - size
        if left > 0:
            self._held[who] = left
        else:
            self._held.pop(who, None)  # the table only lists principals holding something
        self.in_flight -= size
        self._gauge.set(self.in_flight)


BODY_BUDGET = web.AppKey("comfygate.body_budget", BodyBudget)


@dataclass(frozen=True, slots=True)
class BodyReader:
    """What reading an inspected body needs: the process's budget, the largest body read and
    the metrics its refusals count in. Guards get one when the route table is built; the
    module functions find the app's (:meth:`of`) when none is given."""

    budget: BodyBudget
    limit: int
    """Largest body read, in bytes (``server.max_inspected_body_mb``)."""
    metrics: Metrics

    @classmethod
    def of(cls, app: web.Application) -> BodyReader:
        return cls(
            app[BODY_BUDGET], int(app[SETTINGS].server.max_inspected_body_mb * MB), app[METRICS]
        )


@dataclass(slots=True)
class _Lease:
    """What one request holds of the budget; given back once, when the request ends."""

    budget: BodyBudget
    who: str
    held: int = 0
    released: bool = False

    def take(self, size: int) -> str | None:
        refused = self.budget.take(self.who, size)
        if refused is None:
            self.held += size
        return refused

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget.give_back(self.who, self.held)


_LEASE = web.RequestKey("comfygate.body_lease", _Lease)


@web.middleware
async def release_inspected_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gives back what the request held of the budget when it ends: answered, refused, failed
    or cancelled (the client went away)."""
    try:
        return await handler(request)
    finally:
        lease = request.get(_LEASE)
        if lease is not None:
            lease.release()


def _principal_key(ctx: RequestContext) -> str:
    principal = ctx.principal
    if principal is None or principal.source == "anonymous":
        return f"ip:{ctx.client_ip}"  # anonymous callers are told apart by address only
    return f"u:{principal.comfy_user}"  # per user, not per token: more tokens buy nothing


def _lease(request: web.Request, ctx: RequestContext, reader: BodyReader) -> _Lease:
    lease = request.get(_LEASE)
    if lease is None:
        lease = request[_LEASE] = _Lease(reader.budget, _principal_key(ctx))
    return lease


def _hold(reader: BodyReader, ctx: RequestContext, lease: _Lease, size: int) -> None:
    """Hold ``size`` more bytes, or refuse the request (429 over the principal's bound, 503
    over the process's)."""
    refused = lease.take(size)
    if refused is None:
        return
    budget = lease.budget
    _refused(
        reader,
        ctx,
        refused,
        size=size,
        request_held=lease.held,
        principal_held=budget.held_by(lease.who),
        in_flight=budget.in_flight,
    )
    if refused == PRINCIPAL_BOUND:
        raise RateLimited(
            "you have too many large requests in flight; retry when they have finished",
            error_type="too_many_bodies_in_flight",
            retry_after=RETRY_AFTER_SECONDS,
        )
    exc = ServiceUnavailable(
        "the proxy is holding too many request bodies; retry shortly",
        error_type="proxy_busy",
        headers={hdrs.RETRY_AFTER: str(RETRY_AFTER_SECONDS)},
    )
    exc.fields = {"retry_after": RETRY_AFTER_SECONDS}
    raise exc


def _refused(reader: BodyReader, ctx: RequestContext, reason: str, **fields: object) -> None:
    """The metric and the log line of every refusal made here."""
    reader.metrics.inspected_refusals.labels(reason).inc()
    principal = ctx.principal
    log.warning(
        "inspected_body_refused",
        request_id=ctx.request_id,
        rule=ctx.rule.name,
        reason=reason,
        user=principal.comfy_user if principal is not None else None,
        **fields,
    )


# -- reading -----------------------------------------------------------------------------------


async def read_body(
    request: web.Request, ctx: RequestContext, reader: BodyReader | None = None
) -> bytes:
    """The request body, read once and kept in ``ctx.body`` for forwarding; not parsed (see
    :func:`read_json_body` for the parse every inspected route goes through).

    Raises:
        BadRequest: the body has a ``Content-Encoding`` (refused before reading).
        PayloadTooLarge: over ``server.max_inspected_body_mb``.
        RateLimited: over the principal's bound of bytes in flight.
        ServiceUnavailable: over the process's bound of bytes in flight.
    """
    if ctx.body is not None:
        return ctx.body
    reader = reader or BodyReader.of(request.app)
    encodings = [
        token.strip().lower()
        for value in request.headers.getall(hdrs.CONTENT_ENCODING, ())
        for token in value.split(",")
    ]
    if any(e not in ("", "identity") for e in encodings):
        # SECURITY: aiohttp would inflate it as it arrives, so neither the Content-Length nor
        # the bound would describe what is held (a 30 KB gzip body inflates to 32 MB).
        raise _unreadable(
            reader,
            ctx,
            inspected_rule(request.method, ctx) or OBJECT_BODY,
            "content_encoding",
            message="compressed request bodies are not accepted here; send the JSON uncompressed",
            details=f"Content-Encoding: {', '.join(encodings)}",
        )
    limit = reader.limit
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(reader, ctx, limit)
    lease = _lease(request, ctx, reader)
    accounted = 0
    if length is not None:
        _hold(reader, ctx, lease, length)  # before a byte of it is read
        accounted = length
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(reader, ctx, limit)
        if size > accounted:  # chunked: as it arrives
            _hold(reader, ctx, lease, size - accounted)
            accounted = size
        chunks.append(chunk)
    ctx.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    ctx.bytes_in = size
    return ctx.body


def _too_large(reader: BodyReader, ctx: RequestContext, limit: int) -> PayloadTooLarge:
    _refused(reader, ctx, "too_large", limit=limit)
    return PayloadTooLarge(
        f"the request body is over {limit} bytes, the largest the proxy reads",
        details="server.max_inspected_body_mb",
    )


async def read_json_body(
    request: web.Request, ctx: RequestContext, reader: BodyReader | None = None
) -> dict[str, Any]:
    """The body of an inspected route as ComfyUI reads it: always a JSON object.

    The first call reads, checks and parses it (:func:`proxy.comfy.json_body.parse_json`,
    the same strict reading as ``POST /prompt``'s) and replaces ``ctx.body`` by the proxy's own
    serialisation (module doc); later calls return the cached parse.

    Raises:
        BadRequest: the body cannot be read as ComfyUI would, or is not a JSON object.
        PayloadTooLarge, RateLimited, ServiceUnavailable: see :func:`read_body` (which also
            refuses a ``Content-Encoding``).
    """
    cached = ctx.current_parse()
    if isinstance(cached, dict):
        return cached
    reader = reader or BodyReader.of(request.app)
    rule = inspected_rule(request.method, ctx) or OBJECT_BODY
    charset = request.charset
    if charset is not None and not _text_codec(charset):
        raise _unreadable(
            reader,
            ctx,
            rule,
            "charset",
            message="the request body's charset is unknown; send UTF-8 JSON",
            details=f"charset={charset}",
        )
    raw = await read_body(request, ctx, reader)
    value: object
    fast: tuple[Any, bytes] | None = None
    if not raw and rule.empty_is_object:
        value = {}
    else:
        fast = parse_canonical(raw, charset)
        try:
            value = parse_json(raw, charset) if fast is None else fast[0]
        except JsonRefused as exc:
            raise _unreadable(
                reader,
                ctx,
                rule,
                "not_json",
                message=f"the request body cannot be read: {exc}",
                details="the body must be a JSON object, as ComfyUI reads it (json.loads)",
            ) from None
    if not isinstance(value, dict):
        raise _unreadable(
            reader,
            ctx,
            rule,
            "wrong_type",
            message="the request body must be a JSON object",
            details=f"got a JSON {_json_type(value)}",
        )
    # parse_json only accepts what JSON writes back; the fast path has written it already.
    body = fast[1] if fast is not None and fast[0] is value else dump_json(value)
    lease = _lease(request, ctx, reader)
    if len(body) > lease.held:  # escaped characters: the canonical form can be the larger
        _hold(reader, ctx, lease, len(body) - lease.held)
    ctx.body = body
    ctx.parsed_body = (body, value)
    ctx.upstream_headers[hdrs.CONTENT_TYPE] = "application/json"
    return value


def _text_codec(charset: str) -> bool:
    """Whether ``bytes.decode(charset)`` works, as ComfyUI's aiohttp calls it (``base64``
    and friends are codecs but not text encodings: ``decode`` refuses them)."""
    try:
        b" ".decode(charset)  # not b"": decoding nothing never looks the codec up
    except LookupError:
        return False
    except ValueError:
        return True  # a text codec that wants more than one byte (utf-16, utf-32)
    return True


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _unreadable(
    reader: BodyReader,
    ctx: RequestContext,
    rule: BodyRule,
    reason: str,
    *,
    message: str,
    details: str,
) -> Rejection:
    _refused(reader, ctx, reason)
    return BadRequest(message, error_type=rule.error_type, details=details)


class BodyGuard:
    """Reads the body of every inspected route by :func:`read_json_body`'s rule, so none is
    forwarded unread; runs after the rate limit (a flood is refused before its bodies are
    read) and before every guard that decides on the body."""

    name = "body"

    def __init__(self, reader: BodyReader) -> None:
        self._reader = reader

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if inspected_rule(request.method, ctx) is not None:
            await read_json_body(request, ctx, self._reader)


__all__ = [
    "BODY_BUDGET",
    "INSPECTED_RULES",
    "BodyBudget",
    "BodyGuard",
    "BodyReader",
    "BodyRule",
    "inspected_rule",
    "read_body",
    "read_json_body",
    "release_inspected_bodies",
]
