"""Input files present where prompts run: uploads stored on every instance, and inputs copied on
demand to the instance a prompt is placed on.

- **Uploads** (``POST /upload/image``): the body going to the first instance is also written to
  an anonymous temporary file as it streams (never held in memory). Once that instance
  answered ``{"name", "subfolder", "type"}``, the file part is located in the spooled body and
  sent to every other healthy instance, under the *name that instance chose* (ComfyUI renames
  ``x.png`` to ``x (1).png`` on a collision) with ``overwrite=true``, so the same name means the
  same bytes everywhere. ``/upload/mask`` stores a composite of the mask and its original,
  computed by ComfyUI: its result is copied from the first instance instead.
- **On demand** (at submission): each file a prompt reads (``LoadImage.image`` and the other
  file inputs isolation knows) is looked up on the chosen instance (``HEAD /view``); a missing
  one is streamed from an instance that has it (``GET /view``) into ``POST /upload/image``
  there. That covers instances that joined after the upload, and outputs of earlier prompts
  (``x.png [output]``) that ran elsewhere.

Copies use the proxy's own connections, without the client's identity: they only ever put a
file at the path it already has on another instance, after the guards allowed the request.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import IO, Any
from urllib.parse import quote, urlencode

import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.multipart import parse_content_disposition

from proxy.comfy.graph import Prompt, read_graph, strings_in
from proxy.comfy.records import FileRef
from proxy.observability.metrics import Metrics
from proxy.settings.upstreams import PlacementSettings
from proxy.state import RequestContext
from proxy.tenancy.files import (
    FILE_TYPES,
    PathRefused,
    closing,
    field_part,
    file_part_head,
    referenced_file,
)
from proxy.upstream.http1 import UpstreamHttpError
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.upstream.replication")

CHUNK = 256 * 1024
_SCAN_BLOCK = 1024 * 1024
_MAX_PART_HEAD = 16 * 1024
FILE_FIELD = "image"
_TRANSPORT_ERRORS = (UpstreamHttpError, TimeoutError, OSError)

ResponseRewrite = Callable[[int, bytes], Awaitable[bytes]]


# -- which files a prompt reads ------------------------------------------------------------------


def referenced_files(graph: Prompt | object) -> list[FileRef]:
    """``(type, subfolder, name)`` of every file the prompt's nodes read (by name): inputs that
    read files as the schemas declare them (the canonical :class:`Prompt`; a parsed graph is
    read here without schemas), their strings wrapped or reached through primitive nodes."""
    if not isinstance(graph, Prompt):
        if not isinstance(graph, dict):
            return []
        graph = read_graph(graph)
    refs: dict[FileRef, None] = {}
    for node in graph.nodes.values():
        for name, value in node.inputs.items():
            if not graph.reads_files(node, name):
                continue
            for text in strings_in(graph.resolve(value)):
                try:
                    target = referenced_file(text)
                except PathRefused:
                    continue  # ComfyUI refuses it itself
                if target.kind in FILE_TYPES:
                    refs[target.ref] = None
    return list(refs)


# -- moving one file ----------------------------------------------------------------------------


def _view_path(upstream: Upstream, ref: FileRef) -> str:
    kind, folder, name = ref
    query = urlencode(
        [("filename", name), ("subfolder", folder), ("type", kind)], quote_via=quote, safe=""
    )
    return f"{upstream.target_prefix}/view?{query}"


def upload_body(
    boundary: str,
    ref: FileRef,
    content: AsyncIterator[bytes],
    part_headers: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[bytes]:
    """A ``POST /upload/image`` body storing ``content`` exactly at ``ref`` (overwrite)."""
    kind, folder, name = ref

    async def body() -> AsyncIterator[bytes]:
        yield (
            field_part(boundary, "type", kind)
            + field_part(boundary, "subfolder", folder)
            + field_part(boundary, "overwrite", "true")
            + file_part_head(boundary, FILE_FIELD, name, part_headers)
        )
        async for chunk in content:
            if chunk:
                yield chunk
        yield b"\r\n" + closing(boundary)

    return body()


class FileCopier:
    """Puts files on instances (see the module docstring)."""

    def __init__(self, pool: UpstreamPool, metrics: Metrics) -> None:
        self._pool = pool
        self.metrics = metrics

    async def exists(self, upstream: Upstream, ref: FileRef) -> bool | None:
        """``HEAD /view``: True (200), False (404), None (could not tell)."""
        try:
            resp = await self._pool.http1(upstream).request(
                "HEAD", _view_path(upstream, ref), [(hdrs.HOST, upstream.host_header)], None
            )
        except _TRANSPORT_ERRORS:
            return None
        resp.release()
        if resp.status == 200:
            return True
        return False if resp.status == 404 else None

    async def store(
        self,
        target: Upstream,
        ref: FileRef,
        content: AsyncIterator[bytes],
        part_headers: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """Upload ``content`` to ``target`` at exactly ``ref``; whether it was stored."""
        boundary = f"comfygate-{uuid.uuid4().hex}"
        headers: list[tuple[str, str]] = [
            (hdrs.HOST, target.host_header),
            (hdrs.CONTENT_TYPE, f"multipart/form-data; boundary={boundary}"),
        ]
        try:
            resp = await self._pool.http1(target).request(
                "POST",
                target.target_prefix + "/upload/image",
                headers,
                upload_body(boundary, ref, content, part_headers),
            )
            try:
                await resp.read()  # ComfyUI's small JSON answer: read so the connection is reused
            finally:
                resp.release()
        except _TRANSPORT_ERRORS as exc:
            log.warning("file_store_failed", upstream=target.name, error=type(exc).__name__)
            return False
        if resp.status != 200:
            log.warning("file_store_refused", upstream=target.name, status=resp.status)
            return False
        return True

    async def copy(self, ref: FileRef, source: Upstream, target: Upstream, reason: str) -> bool:
        """Stream ``ref`` from ``source`` (``GET /view``) into ``target``."""
        started = time.perf_counter()
        try:
            resp = await self._pool.http1(source).request(
                "GET", _view_path(source, ref), [(hdrs.HOST, source.host_header)], None
            )
        except _TRANSPORT_ERRORS:
            self.metrics.file_copies.labels(reason, "failed").inc()
            return False
        try:
            if resp.status != 200:
                self.metrics.file_copies.labels(reason, "failed").inc()
                return False
            content_type = resp.headers.get(hdrs.CONTENT_TYPE)
            part_headers = [(hdrs.CONTENT_TYPE, content_type)] if content_type else []

            async def content() -> AsyncIterator[bytes]:
                while chunk := await resp.read_chunk():
                    yield chunk

            ok = await self.store(target, ref, content(), part_headers)
        finally:
            resp.release()
        self.metrics.file_copies.labels(reason, "ok" if ok else "failed").inc()
        log.info(
            "file_copied" if ok else "file_copy_failed",
            reason=reason,
            source=source.name,
            target=target.name,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return ok

    async def ensure(self, refs: Sequence[FileRef], target: Upstream) -> None:
        """Make every file of ``refs`` present on ``target`` (copied from an instance that has
        it); files no instance has are left for ComfyUI to report."""
        if refs:
            await asyncio.gather(*(self._ensure_one(ref, target) for ref in refs))

    async def _ensure_one(self, ref: FileRef, target: Upstream) -> None:
        if await self.exists(target, ref) is not False:
            return
        others = [u for u in self._pool.reachable() if u.name != target.name]
        found = await asyncio.gather(*(self.exists(u, ref) for u in others))
        source = next((u for u, ok in zip(others, found, strict=True) if ok), None)
        if source is not None:
            await self.copy(ref, source, target, "on_demand")


# -- uploads ------------------------------------------------------------------------------------


class Spool:
    """An upload body written to an anonymous temporary file while it streams upstream."""

    def __init__(self) -> None:
        self.file: IO[bytes] | None = None
        self.size = 0

    def tee(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async def stream() -> AsyncIterator[bytes]:
            # Blocking file calls run in a thread: a slow disk must not stall the event loop.
            # Unbuffered: replicas read it back by position (os.pread) from other threads.
            file: IO[bytes] = await asyncio.to_thread(tempfile.TemporaryFile, buffering=0)
            self.file = file
            async for chunk in body:
                await asyncio.to_thread(_write_all, file, chunk)
                self.size += len(chunk)
                yield chunk

        return stream()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    async def read_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of the spooled body, in chunks. Positional reads: several
        replicas read the one file at once."""
        file = self.file
        assert file is not None
        fd = file.fileno()
        position = start
        while position < end:
            chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, end - position), position)
            if not chunk:
                return
            position += len(chunk)
            yield chunk


def _write_all(file: IO[bytes], data: bytes) -> None:
    """An unbuffered write may be short: loop until every byte is on disk."""
    view = memoryview(data)
    while view:
        written = file.write(view)
        view = view[written or 0 :]


def locate_file_part(
    file: IO[bytes], boundary: bytes, field: str = FILE_FIELD
) -> tuple[int, int, list[tuple[str, str]]] | None:
    """``(start, end, headers)`` of the file part named ``field`` in a spooled multipart body:
    its content's byte range and its part headers other than Content-Disposition. Blocking
    (run it in a thread); reads the file once in blocks plus each part's small head."""
    delimiter = b"\r\n--" + boundary
    positions: list[int] = []
    file.seek(0)
    buf, base = b"\r\n", -2  # a virtual CRLF so the first delimiter matches too
    keep = len(delimiter) - 1
    while block := file.read(_SCAN_BLOCK):
        buf += block
        at = 0
        while (found := buf.find(delimiter, at)) != -1:
            positions.append(base + found)
            at = found + 1
        cut = max(0, len(buf) - keep)
        base += cut
        buf = buf[cut:]
    for this, following in itertools.pairwise(positions):
        head_start = this + len(delimiter) + 2  # the CRLF after the boundary
        file.seek(head_start)
        head = file.read(_MAX_PART_HEAD)
        end_of_head = head.find(b"\r\n\r\n")
        if end_of_head < 0:
            continue
        headers: list[tuple[str, str]] = []
        name = filename = None
        for line in head[:end_of_head].decode("utf-8", "surrogateescape").split("\r\n"):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key.lower() == "content-disposition":
                _, params = parse_content_disposition(value)
                name, filename = params.get("name"), params.get("filename")
            elif key:
                headers.append((key, value))
        if name == field and filename is not None:
            return head_start + end_of_head + 4, following, headers
    return None


def _boundary(content_type: str) -> bytes | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


class ReplicationGuard:
    """On ``POST /upload/image|mask`` with several instances: the upload goes to a healthy
    instance, and once stored there, to every other healthy one. Runs after isolation, which
    may have replaced the body with its rewritten stream."""

    name = "replication"

    def __init__(self, pool: UpstreamPool, placement: PlacementSettings, metrics: Metrics) -> None:
        self._pool = pool
        self._replicate = placement.replicate_uploads
        self._copier = FileCopier(pool, metrics)

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        pool = self._pool
        if request.method != hdrs.METH_POST or not pool.managed or not self._replicate:
            return
        first = ctx.target or _first_healthy(pool)
        ctx.target = first
        copier = self._copier
        mask = ctx.path == "/upload/mask"
        spool: Spool | None = None
        if not mask:
            spool = Spool()
            body = ctx.body_stream or _request_stream(request, ctx)
            ctx.body_stream = spool.tee(body)
        content_type = (
            ctx.upstream_headers.get(hdrs.CONTENT_TYPE)
            or request.headers.get(hdrs.CONTENT_TYPE)
            or ""
        )
        ctx.response_filters.append(
            _replicate_after(
                copier,
                pool,
                first=first,
                spool=spool,
                boundary=_boundary(content_type),
            )
        )


def _first_healthy(pool: UpstreamPool) -> Upstream:
    home = pool.home()
    if pool.is_healthy(home.name):
        return home
    reachable = pool.reachable()
    return reachable[0] if reachable else home


async def _request_stream(request: web.Request, ctx: RequestContext) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        ctx.bytes_in += len(chunk)
        yield chunk


def _replicate_after(
    copier: FileCopier,
    pool: UpstreamPool,
    *,
    first: Upstream,
    spool: Spool | None,
    boundary: bytes | None,
) -> ResponseRewrite:
    async def rewrite(status: int, body: bytes) -> bytes:
        try:
            ref = _stored_ref(status, body)
            others = [u for u in pool.reachable() if u.name != first.name]
            if ref is not None and others:
                located = None
                if spool is not None and spool.file is not None and boundary is not None:
                    located = await asyncio.to_thread(locate_file_part, spool.file, boundary)
                await asyncio.gather(
                    *(
                        _replicate(copier, spool, located=located, ref=ref, first=first, target=u)
                        for u in others
                    )
                )
        finally:
            if spool is not None:
                spool.close()
        return body

    return rewrite


def _stored_ref(status: int, body: bytes) -> FileRef | None:
    """Where ComfyUI stored the upload, from its 200 answer."""
    if status != 200:
        return None
    try:
        answer: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, dict):
        return None
    name, subfolder, kind = answer.get("name"), answer.get("subfolder", ""), answer.get("type")
    if not isinstance(name, str) or not isinstance(subfolder, str) or kind not in FILE_TYPES:
        return None
    return (str(kind), subfolder, name)


async def _replicate(
    copier: FileCopier,
    spool: Spool | None,
    *,
    located: tuple[int, int, list[tuple[str, str]]] | None,
    ref: FileRef,
    first: Upstream,
    target: Upstream,
) -> None:
    if spool is None or located is None:
        # A mask (ComfyUI stored a composite it computed), or a body we could not read back:
        # copy what the first instance stored.
        await copier.copy(ref, first, target, "replicated")
        return
    start, end, part_headers = located
    ok = await copier.store(target, ref, spool.read_range(start, end), part_headers)
    copier.metrics.file_copies.labels("replicated", "ok" if ok else "failed").inc()
    if not ok:
        log.warning("upload_replication_failed", upstream=target.name)


__all__ = [
    "FileCopier",
    "ReplicationGuard",
    "Spool",
    "locate_file_part",
    "referenced_files",
    "upload_body",
]
