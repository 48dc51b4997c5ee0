"""Answers the proxy reads are read in a known encoding; its own answers are encoded for the client.

ComfyUI started with ``--enable-compress-response-body`` compresses every non-empty
``application/json`` or ``text/plain`` answer, whatever its status, when the request's
``Accept-Encoding`` contains the substring ``gzip`` (aiohttp then picks ``deflate`` first when
that is named too; q-values are not read). A filter that skipped encoded bodies passed them
unfiltered (issue 13, item 4). So every answer the proxy inspects (history, queue and job
views, ``/system_stats``, upload and submission answers, merged views, its own background
reads) goes through this module:

- it is asked for with ``Accept-Encoding: identity`` (:func:`ask_identity`): ComfyUI's
  middleware then leaves it plain;
- it is read by :func:`decode` (or :func:`read_client_answer`): no coding or ``identity``
  passes; ``gzip``/``x-gzip``/``deflate`` are decoded within the same byte bound as the raw
  body (a middleware that compresses regardless, or the catalog, which asks for gzip to learn
  whether ComfyUI compresses); anything else (``br``, ``zstd``, stacked codings, a corrupt or
  truncated stream) raises :class:`UnreadableAnswer`, a 502 ``upstream_bad_encoding``, logged
  and counted (``comfygate_upstream_errors{kind="bad_encoding"}``). What cannot be read is
  never passed on.

Toward the client, the proxy's own serialisation is gzip-compressed when the client accepts
gzip (:func:`compress_for_client`), q-values honoured, so browsers keep their compression.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import aiohttp
import structlog
from aiohttp import hdrs, web
from aiohttp.web_response import ContentCoding
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import UpstreamError, UpstreamUnavailable

if TYPE_CHECKING:
    from proxy.observability.metrics import Metrics

log = structlog.get_logger("comfygate.encoding")

IDENTITY = "identity"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""The codings the proxy decodes, with their zlib framing (HTTP ``deflate`` is zlib-wrapped)."""
DECODABLE = frozenset(_WBITS)

Headers = CIMultiDict[str] | CIMultiDictProxy[str]
MIN_COMPRESSED_BYTES = 1024
"""Smaller answers go out unencoded: gzip saves nothing on them (``{}`` would grow to 22 bytes)."""
BACKGROUND_LIMIT = 256 * 1024 * 1024
"""Bound on an answer the proxy reads for its own bookkeeping, outside any request (queue,
history and probe reads; a full queue lists every queued graph)."""


class UnreadableAnswer(UpstreamError):
    """ComfyUI's answer came in an encoding the proxy cannot read: it cannot be filtered, so it
    is not sent to anyone."""

    status = 502
    error_type = "upstream_bad_encoding"


class AnswerTooLarge(UpstreamUnavailable):
    """The answer (raw, or once decoded) is larger than the proxy reads."""


def ask_identity(headers: CIMultiDict[str]) -> None:
    """Ask ComfyUI for an unencoded answer (its compressing middleware looks for ``gzip``)."""
    headers.popall(hdrs.ACCEPT_ENCODING, None)
    headers[hdrs.ACCEPT_ENCODING] = IDENTITY


def content_codings(headers: Headers) -> list[str]:
    """The codings applied to a body, in order, ``identity`` left out (every header line)."""
    codings = (
        c.strip().lower() for v in headers.getall(hdrs.CONTENT_ENCODING, ()) for c in v.split(",")
    )
    return [c for c in codings if c and c != IDENTITY]


def decode(
    raw: bytes,
    headers: Headers,
    *,
    limit: int,
    upstream: str,
    metrics: Metrics | None = None,
) -> bytes:
    """``raw`` (at most ``limit`` bytes, as received) decoded to identity, at most ``limit``.

    Raises:
        UnreadableAnswer: a coding other than gzip/deflate, several, or a corrupt stream.
        AnswerTooLarge: the decoded body is larger than ``limit``.
    """
    codings = content_codings(headers)
    if not codings:
        return raw
    if len(codings) != 1 or codings[0] not in DECODABLE:
        raise _unreadable(upstream, ",".join(codings), metrics)
    if not raw:
        return raw  # nothing encoded, nothing to hide
    decoder = zlib.decompressobj(_WBITS[codings[0]])
    try:
        # Bounded: a small bomb must not become gigabytes in memory.
        out = decoder.decompress(raw, limit + 1)
    except zlib.error:
        raise _unreadable(upstream, codings[0], metrics, corrupt=True) from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise AnswerTooLarge(f"ComfyUI at {upstream}: answer too large to inspect")
    if not decoder.eof or decoder.unused_data:
        raise _unreadable(upstream, codings[0], metrics, corrupt=True)  # truncated or trailing
    return out


def _unreadable(
    upstream: str, coding: str, metrics: Metrics | None, *, corrupt: bool = False
) -> UnreadableAnswer:
    if metrics is not None:
        metrics.upstream_errors.labels(upstream, "bad_encoding").inc()
    log.warning("upstream_answer_unreadable", upstream=upstream, coding=coding, corrupt=corrupt)
    what = f"a corrupt {coding} body" if corrupt else f"an answer encoded as {coding!r}"
    return UnreadableAnswer(f"ComfyUI at {upstream} sent {what}; it is not passed on")


async def read_client_answer(
    resp: aiohttp.ClientResponse,
    *,
    limit: int,
    upstream: str,
    metrics: Metrics | None = None,
) -> bytes:
    """The whole body of an answer read through the pool's client session (which does not
    decompress), decoded like :func:`decode`.

    Raises:
        UnreadableAnswer, AnswerTooLarge: see :func:`decode` (also for a raw body over ``limit``).
        aiohttp.ClientError, TimeoutError, OSError: the exchange broke.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(f"ComfyUI at {upstream}: answer too large to inspect")
        chunks.append(chunk)
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return decode(raw, resp.headers, limit=limit, upstream=upstream, metrics=metrics)


# -- toward the client -------------------------------------------------------------------------


def accepts_gzip(values: Iterable[str]) -> bool:
    """Whether ``Accept-Encoding`` (every line of it) accepts gzip (RFC 9110 12.5.3): named with
    a non-zero q (``x-gzip`` too), or not named and ``*`` has a non-zero q. A malformed q-value
    accepts nothing."""
    named: float | None = None
    anything: float | None = None
    for value in values:
        for item in value.split(","):
            coding, _, params = item.partition(";")
            coding = coding.strip().lower()
            if not coding:
                continue
            q = _qvalue(params)
            if coding in ("gzip", "x-gzip"):
                named = q if named is None else max(named, q)
            elif coding == "*":
                anything = q
    if named is not None:
        return named > 0
    return anything is not None and anything > 0


def _qvalue(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def compress_for_client(request: web.Request, response: web.Response) -> None:
    """gzip ``response`` (before it is prepared) when the client accepts gzip and its body has
    at least :data:`MIN_COMPRESSED_BYTES`; ``Vary: Accept-Encoding`` either way (the
    representation depends on it). For HEAD aiohttp announces the compressed length, as for the
    GET."""
    vary = response.headers.get(hdrs.VARY, "")
    if hdrs.ACCEPT_ENCODING.lower() not in vary.lower():
        response.headers[hdrs.VARY] = (
            f"{vary}, {hdrs.ACCEPT_ENCODING}" if vary else "Accept-Encoding"
        )
    body = response.body
    if (
        isinstance(body, bytes)
        and len(body) >= MIN_COMPRESSED_BYTES
        and accepts_gzip(request.headers.getall(hdrs.ACCEPT_ENCODING, ()))
    ):
        if len(body) < SIZED_WINDOW_BELOW:
            response.body = gzip_sized(body)
            response.headers[hdrs.CONTENT_ENCODING] = ContentCoding.gzip.value
        else:
            response.enable_compression(ContentCoding.gzip)


SIZED_WINDOW_BELOW = 32 * 1024
"""Bodies shorter than zlib's largest window are compressed by :func:`gzip_sized`."""


def gzip_sized(body: bytes) -> bytes:
    """gzip of ``body`` (level 6, as aiohttp's) with a window and hash table sized to it.

    zlib's defaults (a 32 KiB window, a 64 Ki-entry hash table: some 256 KiB set up and cleared
    per stream) cost more than compressing a 2 KiB history entry; a window that covers the
    whole body finds the same matches, so the output is the same size (any gzip reader takes
    any window). Sync, like aiohttp's own compression of bodies this small.
    """
    wbits = max(10, (len(body) - 1).bit_length())  # window >= body: no match is out of reach
    mem_level = max(1, min(8, wbits - 7))  # hash bits = mem_level + 7 ~ window bits
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + wbits, mem_level)
    return compressor.compress(body) + compressor.flush()


__all__ = [
    "BACKGROUND_LIMIT",
    "DECODABLE",
    "IDENTITY",
    "MIN_COMPRESSED_BYTES",
    "SIZED_WINDOW_BELOW",
    "AnswerTooLarge",
    "UnreadableAnswer",
    "accepts_gzip",
    "ask_identity",
    "compress_for_client",
    "content_codings",
    "decode",
    "gzip_sized",
    "read_client_answer",
]
