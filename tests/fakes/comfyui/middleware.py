"""Middlewares of the fake, in ComfyUI's order.

See docs/comfyui-protocol.md#server-architecture, docs/comfyui-protocol.md#static-files and
docs/comfyui-protocol.md#origin-and-host-check:

``record`` (fake only: fills :attr:`FakeComfyUI.received`) -> ``cache_control`` (newer
``middleware/cache_middleware.py``) -> ``compress_body`` (only with
``--enable-compress-response-body``) -> ``origin_only`` (``server.py`` 0.3.64 plus the newer
``Sec-Fetch-Site: cross-site`` rule) -> ``read_body`` (fake only: reads the body once, honouring
``client_max_size`` -> 413, and stores it in the record).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from aiohttp import StreamReader, web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict, MultiDict

if TYPE_CHECKING:
    from .server import FakeComfyUI

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BODY_KEEP_LIMIT = 1024 * 1024
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ONE_HOUR, ONE_DAY = 3600, 86400


@dataclass
class Received:
    """One HTTP request as the fake saw it (WS handshakes included)."""

    method: str
    raw_path: str  # path + query exactly as on the wire (keeps %2F)
    path: str  # percent-decoded path
    query: MultiDict[str]
    headers: CIMultiDict[str]
    body: bytes = b""  # b"" when body_length > 1 MiB
    body_length: int = 0
    remote: str | None = None
    route: str | None = None
    """The route aiohttp's router resolved the target to (its resource's canonical path, e.g.
    ``/api/history/{prompt_id}``; ``""`` for the web root's static files); None when no route
    accepts it (404/405): what ComfyUI would run for the request."""
    body_read: bool = field(default=False, repr=False)


RECORD_KEY = web.RequestKey("fake_comfyui.received", Received)


def make_record(fake: FakeComfyUI) -> Middleware:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/__fake__/"):
            return await handler(request)
        rec = Received(
            method=request.method,
            raw_path=request.raw_path,
            path=request.path,
            query=MultiDict(request.query),
            headers=CIMultiDict(request.headers),
            remote=request.remote,
            route=_resolved_route(request),
        )
        fake.received.append(rec)
        request[RECORD_KEY] = rec
        try:
            return await handler(request)
        finally:
            # Requests refused before their body was read (403, OPTIONS): keep small bodies too.
            length = request.content_length
            if not rec.body_read and length and length <= BODY_KEEP_LIMIT:
                with contextlib.suppress(
                    web.HTTPException, ConnectionError, asyncio.IncompleteReadError
                ):
                    _store(rec, await request.read())

    return cast(Middleware, record)


def _resolved_route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource  # None: 404/405 (aiohttp's SystemRoute)
    return None if resource is None else resource.canonical


def _store(rec: Received, body: bytes) -> None:
    rec.body_read = True
    rec.body_length = len(body)
    rec.body = body if len(body) <= BODY_KEEP_LIMIT else b""


READS_FILE_FIRST = frozenset({"/settings", "/api/settings", "/settings/{id}", "/api/settings/{id}"})
"""Routes whose handler must see its body arrive late, as in ComfyUI: ``AppSettings`` reads
``comfy.settings.json`` *before* it awaits the body, so two concurrent writes can lose one (seen
on a real 0.3.64). The record gets their body after the handler (:func:`make_record`)."""


@web.middleware
async def read_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the body once (413 past client_max_size) so the record has it; multipart handlers
    then parse a fresh stream with the same bytes."""
    rec = request.get(RECORD_KEY)
    if rec is not None and request.body_exists and rec.route not in READS_FILE_FIRST:
        body = await request.read()
        _store(rec, body)
        if request.content_type == "multipart/form-data":
            stream = StreamReader(request.protocol, 2**16, loop=asyncio.get_running_loop())
            stream.feed_data(body)
            stream.feed_eof()
            request._payload = stream
    return await handler(request)


@web.middleware
async def cache_control(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    name = request.path.rsplit("/", 1)[-1]
    entry_point = name.startswith("index") and name.endswith(".json")
    if request.path.endswith((".js", ".css")) or entry_point:
        response.headers.setdefault("Cache-Control", "no-cache")
        return response
    if not request.path.lower().endswith(IMG_EXTENSIONS):
        return response
    if response.status == 404:
        response.headers.setdefault("Cache-Control", f"public, max-age={ONE_HOUR}")
    elif response.status in (200, 201, 202, 203, 204, 205, 206, 301, 308):
        response.headers.setdefault("Cache-Control", f"public, max-age={ONE_DAY}")
    elif response.status in (302, 303, 307):
        response.headers.setdefault("Cache-Control", f"public, max-age={ONE_HOUR}")
    return response


COMPRESSED_CONTENT_TYPES = ("application/json", "text/plain")


@web.middleware
async def compress_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``--enable-compress-response-body`` (``server.py``, Comfy-Org/ComfyUI ``a125cd8``).

    What ComfyUI does, checked against its source: whole ``web.Response`` answers only (not
    streamed or file responses), whose content type is exactly JSON or plain text, with a
    non-empty body, any status (errors too), HEAD too; when the *substring* ``gzip`` occurs
    in the request's ``Accept-Encoding`` (case-sensitive, q-values not read: ``gzip;q=0``
    compresses). The coding is then aiohttp's own choice (``enable_compression()`` without
    ``force``): the first of ``deflate``, ``gzip``, ``identity`` named in the lowercased header,
    so ``gzip, deflate`` gets deflate.
    """
    accept_encoding = request.headers.get("Accept-Encoding", "")
    response = await handler(request)
    if (
        isinstance(response, web.Response)
        and response.content_type in COMPRESSED_CONTENT_TYPES
        and response.body
        and "gzip" in accept_encoding
    ):
        response.enable_compression()
    return response


class LoopbackResolver:
    """``is_loopback`` of ComfyUI: IP literal, or every DNS answer loopback (cached here)."""

    def __init__(self) -> None:
        self._cache: dict[str, bool] = {}

    async def is_loopback(self, host: str | None) -> bool:
        if host is None:
            return False
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        if host in self._cache:
            return self._cache[host]
        loop = asyncio.get_running_loop()
        loopback = False
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                answers = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
            except socket.gaierror:
                continue
            for _family, _type, _proto, _name, sockaddr in answers:
                if not ipaddress.ip_address(sockaddr[0]).is_loopback:
                    self._cache[host] = loopback
                    return loopback
                loopback = True
        self._cache[host] = loopback
        return loopback


def make_origin_only(fake: FakeComfyUI) -> Middleware:
    resolver = LoopbackResolver()

    @web.middleware
    async def origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        if fake.sec_fetch_check and request.headers.get("Sec-Fetch-Site") == "cross-site":
            return web.Response(status=403)
        if fake.origin_check and "Host" in request.headers and "Origin" in request.headers:
            host_domain: str | None = request.headers["Host"].lower()
            parsed = urllib.parse.urlparse(request.headers["Origin"])
            origin_domain: str | None = parsed.netloc.lower()
            host_parsed = urllib.parse.urlsplit("//" + (host_domain or ""))
            try:
                origin_port, host_port = parsed.port, host_parsed.port
            except ValueError:
                origin_port = host_port = None
            loopback = await resolver.is_loopback(host_parsed.hostname)
            if origin_port is None:
                host_domain = host_parsed.hostname
            if host_port is None:
                origin_domain = parsed.hostname
            if loopback and host_domain and origin_domain and host_domain != origin_domain:
                return web.Response(status=403)
        if request.method == "OPTIONS":
            return web.Response()
        return await handler(request)

    return cast(Middleware, origin_only)


def make_faults(fake: FakeComfyUI) -> Middleware:
    """Fake-only failures (:attr:`FakeComfyUI.fail_status`, :attr:`FakeComfyUI.fail_prompts`)."""

    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/__fake__/"):
            return await handler(request)
        if fake.fail_status is not None:
            return web.Response(status=fake.fail_status, text="fake failure")
        if (
            fake.fail_prompts > 0
            and request.method == "POST"
            and request.path in ("/prompt", "/api/prompt")
        ):
            fake.fail_prompts -= 1
            await request.read()
            return web.Response(status=500, text="500 Internal Server Error (fake)")
        return await handler(request)

    return cast(Middleware, faults)
