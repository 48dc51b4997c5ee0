"""``/userdata``, ``/v2/userdata`` and ``/settings``: each user's own, whatever ComfyUI's flags.

With ``--multi-user`` ComfyUI keeps a directory per ``Comfy-User`` (which the proxy always sets
from the principal), so requests pass in the proxy's canonical form. Without it, every request is
ComfyUI's user ``default`` and all users would share saved workflows, settings and ``user.css``;
for a non-admin caller the proxy then confines every path to ``comfygate-users/<comfy_user>/``
under that user's directory and answers ``/settings`` itself from the ``comfy.settings.json``
kept there. Admins keep the real view. Decided on one parse of each request (:func:`parse_call`):

=====================================  ========================================================
``GET /userdata?dir=&recurse=&...``    ``dir`` canonicalised and prefixed; answer relative to
                                       ``dir`` already (passes as is)
``GET /v2/userdata?path=``             ``path`` canonicalised and prefixed; each entry's ``path``
                                       made relative to the caller's folder again; a missing
                                       own folder lists as ``[]`` (as ComfyUI's missing root)
``GET|HEAD|POST|DELETE /userdata/{f}`` ``{f}`` canonicalised and prefixed; a ``POST`` answer's
                                       path made relative again; the caller's ``user.css`` is
                                       served as a stylesheet (as ComfyUI serves its own)
``POST /userdata/{f}/move/{dest}``     both canonicalised and prefixed; answer as ``POST``
``/settings``, ``/settings/{id}``      read, merged and written as ComfyUI's ``AppSettings``
                                       does, in the caller's ``comfy.settings.json``
=====================================  ========================================================

Traversal, absolute paths and anything that cannot be canonicalised are refused before ComfyUI
in every mode (403, or 400 for ``/v2/userdata`` as ComfyUI answers); other path shapes get 404.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiDictProxy
from yarl import URL

from proxy.errors import BadRequest, Forbidden, NotFound, ProxyError, UpstreamUnavailable
from proxy.observability.metrics import METRICS
from proxy.redis.client import REDIS
from proxy.relay.forward import forward_http
from proxy.relay.home import home_for
from proxy.relay.outgoing import build_upstream_headers, map_client_error
from proxy.request.bodies import read_body
from proxy.routes import normalise_path
from proxy.settings import SETTINGS
from proxy.state import CONTEXT, RequestContext
from proxy.upstream.headers import client_response_headers
from proxy.upstream.http1 import UpstreamHttpError
from proxy.upstream.pool import POOL, Upstream
from proxy.userdata.mode import UserModes
from proxy.userdata.paths import (
    PREFIX_ROOT,
    Segments,
    UserdataPathError,
    canonical,
    comfy_unquote_again,
    dir_query,
    path_param,
    route_value,
    strip_prefix,
    v2_path_query,
)
from proxy.userdata.settings_lock import REDIS_OP, SettingsLocks, hold_all, settings_locks

USERDATA_RULES = frozenset({"userdata", "settings"})
"""The route rules (``proxy.routes``) this module serves."""
Kind = Literal["list", "list_v2", "file", "move", "settings", "setting"]
SETTINGS_FILE: Segments = ("comfy.settings.json",)
"""``AppSettings``' file, in the user's directory (here: the caller's own folder)."""
USER_CSS: Segments = ("user.css",)
_READS = frozenset({"GET", "HEAD"})
_CLIENT_ERRORS = (UpstreamHttpError, TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class UserdataCall:
    """One request to ComfyUI's user-data routes, as ComfyUI will read it."""

    kind: Kind
    method: str
    file: Segments = ()
    """``{file}``, the ``dir``/``path`` listed (``()`` = the root, ``/v2/userdata`` only)."""
    dest: Segments = ()
    flags: tuple[tuple[str, str], ...] = ()
    """The query parameters ComfyUI reads, in canonical form (``recurse=true``...)."""
    setting_id: str = ""


def _refused(message: str, *, v2: bool = False) -> ProxyError:
    if v2:  # ComfyUI's own status for a bad ``path`` on /v2/userdata
        return BadRequest(message, error_type="bad_userdata_path")
    return Forbidden(message, error_type="bad_userdata_path")


def _flags(query: MultiDictProxy[str], names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The boolean parameters ComfyUI reads, each as ``true``/``false`` as ComfyUI reads it
    (first value; ``overwrite`` is true unless exactly ``false``, the others only when
    ``true`` in any case), in the order the client gave them; absent ones stay absent."""
    flags: list[tuple[str, str]] = []
    for name in dict.fromkeys(n for n in query if n in names):
        value = query[name]
        on = value != "false" if name == "overwrite" else value.lower() == "true"
        flags.append((name, "true" if on else "false"))
    return tuple(flags)


_LIST_FLAGS = ("recurse", "full_info", "split")
_WRITE_FLAGS = ("overwrite", "full_info")


def parse_call(method: str, path: str, query: MultiDictProxy[str]) -> UserdataCall:
    """The call ``method path?query`` makes (``path`` normalised as ``proxy.routes`` does).

    Raises:
        ProxyError: a path ComfyUI would resolve to something the proxy cannot vouch for (403,
            400 on ``/v2/userdata``), a missing ``dir`` (400), a shape ComfyUI has no route for
            (404) or a method it does not serve there (405).
    """
    segments = path.split("/")[1:]
    try:
        if segments == ["userdata"]:
            _allow(method, _READS)
            directory = query.get("dir", "")
            if not directory:
                raise BadRequest("dir is required", error_type="bad_userdata_path")
            listed = canonical(comfy_unquote_again(directory), directory=True)
            if not listed:
                raise UserdataPathError("the root cannot be listed with dir=")
            return UserdataCall("list", method, file=listed, flags=_flags(query, _LIST_FLAGS))
        if segments == ["v2", "userdata"]:
            _allow(method, _READS)
            try:
                listed = canonical(
                    comfy_unquote_again(unquote(query.get("path", ""))), directory=True
                )
            except UserdataPathError as exc:
                raise _refused(f"user data path refused: {exc}", v2=True) from None
            return UserdataCall("list_v2", method, file=listed)
        if len(segments) == 2 and segments[0] == "userdata" and segments[1]:
            _allow(method, _READS | {"POST", "DELETE"})
            file = canonical(comfy_unquote_again(route_value(segments[1])))
            flags = _flags(query, _WRITE_FLAGS) if method == "POST" else ()
            return UserdataCall("file", method, file=file, flags=flags)
        if (
            len(segments) == 4
            and segments[0] == "userdata"
            and segments[2] == "move"
            and segments[1]
            and segments[3]
        ):
            _allow(method, frozenset({"POST"}))
            source = canonical(comfy_unquote_again(route_value(segments[1])))
            dest = canonical(comfy_unquote_again(route_value(segments[3])))
            return UserdataCall(
                "move", method, file=source, dest=dest, flags=_flags(query, _WRITE_FLAGS)
            )
        if segments == ["settings"]:
            _allow(method, _READS | {"POST"})
            return UserdataCall("settings", method)
        if len(segments) == 2 and segments[0] == "settings" and segments[1]:
            _allow(method, _READS | {"POST"})
            return UserdataCall("setting", method, setting_id=route_value(segments[1]))
    except UserdataPathError as exc:
        raise _refused(f"user data path refused: {exc}") from None
    raise NotFound(f"ComfyUI has no user data route {path}", error_type="not_found")


def _allow(method: str, methods: frozenset[str]) -> None:
    if method not in methods:
        raise ProxyError(
            f"method {method} not allowed here", error_type="method_not_allowed", status=405
        )


def upstream_target(call: UserdataCall, own: Segments, api: str) -> str:
    """The proxy's serialisation of ``call`` for ComfyUI, under the caller's folder ``own``."""
    flags = "&".join(f"{name}={value}" for name, value in call.flags)
    if call.kind == "list":
        query = f"dir={dir_query(own + call.file)}" + (f"&{flags}" if flags else "")
        return f"{api}/userdata?{query}"
    if call.kind == "list_v2":
        return f"{api}/v2/userdata?path={v2_path_query(own + call.file)}"
    target = f"{api}/userdata/{path_param(own + call.file)}"
    if call.kind == "move":
        target += f"/move/{path_param(own + call.dest)}"
    return f"{target}?{flags}" if flags else target


@dataclass(slots=True)
class Userdata:
    """What the handler keeps between requests."""

    modes: UserModes
    settings_locks: SettingsLocks
    """One writer at a time per settings file, across replicas with Redis (settings_lock.py)."""


USERDATA = web.AppKey("comfygate.userdata", Userdata)


async def userdata_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` (after ``redis_client``): the settings locks, the ``--multi-user``
    detector and, with
    ``upstream.check_multi_user_at_startup``, a startup probe of every instance for the log line
    (in the background: startup does not wait for ComfyUI)."""
    modes = UserModes(app[POOL])
    errors = app[METRICS].redis_errors
    locks = settings_locks(app[REDIS], lambda kind: errors.labels(REDIS_OP, kind).inc())
    app[USERDATA] = Userdata(modes=modes, settings_locks=locks)
    if app[SETTINGS].upstream.check_multi_user_at_startup:
        modes.startup = asyncio.create_task(modes.probe_all(), name="comfygate-user-modes")
    yield
    if modes.startup is not None:
        modes.startup.cancel()
        await asyncio.gather(modes.startup, return_exceptions=True)


async def own_folder(request: web.Request, ctx: RequestContext, upstream: Upstream) -> Segments:
    """The caller's folder under ComfyUI's user directory: ``()`` (the real view) for admins
    and when ComfyUI keeps users apart itself."""
    principal = ctx.principal
    if principal is None:  # pragma: no cover - the auth guard runs first
        raise Forbidden("not authenticated", error_type="forbidden")
    if principal.is_admin(request.app[SETTINGS].roles):
        return ()
    if await request.app[USERDATA].modes.multi_user(upstream):
        return ()
    return (PREFIX_ROOT, principal.comfy_user)


async def serve_userdata(request: web.Request) -> web.StreamResponse:
    """The terminal handler of the ``userdata`` and ``settings`` rules (home instance)."""
    ctx = request[CONTEXT]
    raw_path, _, raw_query = ctx.upstream_path.partition("?")
    query = URL.build(query_string=raw_query, encoded=True).query
    call = parse_call(request.method, ctx.path, query)
    upstream = ctx.target or home_for(request)  # 503 while the home instance is down
    own = await own_folder(request, ctx, upstream)
    api = "/api" if normalise_path(raw_path)[1] else ""
    keys = settings_lock_keys(request, upstream, call, own)
    locks = request.app[USERDATA].settings_locks
    if call.kind in ("settings", "setting"):
        if not own:  # ComfyUI's AppSettings, per Comfy-User (or the admins' real view)
            async with hold_all(locks, keys):  # no keys for a read
                return await forward_http(request)
        return await _settings(request, ctx, upstream, call, own=own, api=api, keys=keys)
    ctx.upstream_path = upstream_target(call, own, api)
    async with hold_all(locks, keys):  # a write that replaces a settings file
        if own:
            if call.kind == "list_v2":
                return await _list_v2(request, ctx, upstream, call, own)
            if call.kind in ("file", "move") and call.method == "POST":
                return await _written(request, ctx, upstream, call, own)
            if call.kind == "file" and call.method in _READS and call.file == USER_CSS:
                return await _user_css(request, ctx, upstream)
        return await forward_http(request)


def settings_lock_keys(
    request: web.Request, upstream: Upstream, call: UserdataCall, own: Segments
) -> tuple[str, ...]:
    """The settings files (``comfy.settings.json``) a write changes, each as the key of its lock:
    the instance, the user ComfyUI files it under and the folder there. ``POST /settings*``
    changes the caller's own; a ``/userdata`` write, delete or move whichever it names. Reads
    take no lock (ComfyUI writes a file in one synchronous step)."""
    if call.method in _READS:
        return ()
    if call.kind in ("settings", "setting"):
        folders = [own]
    elif call.kind in ("file", "move"):
        folders = [(own + p)[:-1] for p in (call.file, call.dest) if p[-1:] == SETTINGS_FILE]
    else:
        return ()
    if not folders:
        return ()
    principal = request[CONTEXT].principal
    assert principal is not None  # own_folder refused an unauthenticated caller
    # Whom ComfyUI files it under: a confined caller's folder is user ``default``'s (ComfyUI
    # without --multi-user); an unconfined non-admin is their own Comfy-User (--multi-user); an
    # admin's real view is either, and both are locked rather than asking ComfyUI which.
    if own:
        filed: tuple[str, ...] = ("default",)
    elif principal.is_admin(request.app[SETTINGS].roles):
        filed = (principal.comfy_user, "default")
    else:
        filed = (principal.comfy_user,)
    return tuple(
        f"{upstream.name}|{user}|{'/'.join(folder)}" for user in filed for folder in folders
    )


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes

    def relay(self) -> web.Response:
        """ComfyUI's answer as it came (for statuses the proxy does not rewrite)."""
        return web.Response(
            status=self.status, reason=self.reason, headers=self.headers, body=self.body
        )


async def _exchange(
    request: web.Request,
    ctx: RequestContext,
    upstream: Upstream,
    method: str,
    target: str,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
) -> _Answer:
    """One request to ComfyUI whose answer the proxy reads whole (in identity encoding, bounded
    by ``server.max_inspected_body_mb``) before answering the client itself."""
    pool = request.app[POOL]
    headers = build_upstream_headers(request, ctx, upstream)
    for name in (
        hdrs.CONTENT_LENGTH,
        hdrs.TRANSFER_ENCODING,
        hdrs.CONTENT_ENCODING,
        hdrs.CONTENT_TYPE,
        hdrs.EXPECT,
    ):
        headers.popall(name, None)
    headers[hdrs.ACCEPT_ENCODING] = "identity"  # the answer is read, so it must be readable
    if body is not None:
        headers[hdrs.CONTENT_LENGTH] = str(len(body))
        headers[hdrs.CONTENT_TYPE] = content_type or "application/octet-stream"
    ctx.upstream = upstream.name
    limit = int(request.app[SETTINGS].server.max_inspected_body_mb * 1024 * 1024)
    started = time.perf_counter()
    try:
        resp = await pool.http1(upstream).request(
            method, upstream.target_prefix + target, list(headers.items()), body
        )
        pool.report_response(upstream, resp.status)
        try:
            chunks: list[bytes] = []
            size = 0
            while chunk := await resp.read_chunk():
                size += len(chunk)
                if size > limit:
                    raise UpstreamUnavailable("ComfyUI's user data answer is too large to read")
                chunks.append(chunk)
        finally:
            resp.release()
    except _CLIENT_ERRORS as exc:
        raise map_client_error(exc, upstream, request) from None
    finally:
        ctx.upstream_seconds += time.perf_counter() - started
    payload = b"".join(chunks)
    if resp.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity" and payload:
        raise UpstreamUnavailable(
            "ComfyUI answered a user data request encoded although asked for identity",
            error_type="upstream_encoded",
        )
    out = client_response_headers(resp.headers)
    for name in (hdrs.CONTENT_LENGTH, hdrs.CONTENT_ENCODING):
        out.popall(name, None)
    ctx.bytes_out = len(payload)
    return _Answer(resp.status, resp.reason, out, payload)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", charset="utf-8"
    )


def _unexpected(what: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        f"unexpected answer from ComfyUI to {what}", error_type="bad_upstream"
    )


async def _list_v2(
    request: web.Request, ctx: RequestContext, upstream: Upstream, call: UserdataCall, own: Segments
) -> web.StreamResponse:
    answer = await _exchange(request, ctx, upstream, "GET", ctx.upstream_path)
    if answer.status == 404 and call.file == ():
        return _json([])  # the caller's folder does not exist yet: ComfyUI's "new user" answer
    if answer.status != 200:
        return answer.relay()
    try:
        entries = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise _unexpected("GET /v2/userdata") from None
    if not isinstance(entries, list):
        raise _unexpected("GET /v2/userdata")
    for entry in entries:
        path = entry.get("path") if isinstance(entry, dict) else None
        relative = strip_prefix(path, own) if isinstance(path, str) else None
        if relative is None:
            raise _unexpected("GET /v2/userdata")
        entry["path"] = relative
    return _json(entries)


async def _written(
    request: web.Request, ctx: RequestContext, upstream: Upstream, call: UserdataCall, own: Segments
) -> web.StreamResponse:
    """``POST /userdata/{file}`` and ``.../move/{dest}``: the answer names the written file
    relative to the real user directory; the caller gets it relative to their own folder."""
    body = await read_body(request, ctx) if call.kind == "file" else None
    content_type = request.headers.get(hdrs.CONTENT_TYPE)
    answer = await _exchange(
        request, ctx, upstream, "POST", ctx.upstream_path, body=body, content_type=content_type
    )
    if answer.status != 200:
        return answer.relay()
    try:
        result = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise _unexpected(f"POST /userdata ({call.kind})") from None
    if isinstance(result, str) and (relative := strip_prefix(result, own)) is not None:
        return _json(relative)
    if isinstance(result, dict) and isinstance(result.get("path"), str):
        relative = strip_prefix(result["path"], own)
        if relative is not None:
            return _json({**result, "path": relative})
    raise _unexpected(f"POST /userdata ({call.kind})")


async def _user_css(
    request: web.Request, ctx: RequestContext, upstream: Upstream
) -> web.StreamResponse:
    """The caller's ``user.css``: ComfyUI serves only the user root's ``user.css`` as an inline
    stylesheet (newer versions send other files as attachments, CSS as octet-stream with
    ``nosniff``), so the proxy gives the caller's own one the same treatment."""
    answer = await _exchange(request, ctx, upstream, "GET", ctx.upstream_path)
    if answer.status != 200:
        return answer.relay()
    headers = answer.headers
    for name in (hdrs.CONTENT_TYPE, hdrs.CONTENT_DISPOSITION):
        headers.popall(name, None)
    headers["X-Content-Type-Options"] = "nosniff"
    return web.Response(body=answer.body, headers=headers, content_type="text/css")


# -- /settings, for a caller confined to their own folder ---------------------------------------


async def _settings(
    request: web.Request,
    ctx: RequestContext,
    upstream: Upstream,
    call: UserdataCall,
    *,
    own: Segments,
    api: str,
    keys: tuple[str, ...],
) -> web.StreamResponse:
    """``AppSettings`` on the caller's own ``comfy.settings.json`` (read through ComfyUI's
    ``/userdata``): ``GET`` answers the object (``{}`` when there is none) or one value
    (``null`` when unset); ``POST`` merges an object or sets one value, then writes the file."""
    target = f"{api}/userdata/{path_param(own + SETTINGS_FILE)}"
    if call.method in _READS:
        current = await _read_settings(request, ctx, upstream, target)
        return _json(current if call.kind == "settings" else current.get(call.setting_id))
    body = await read_body(request, ctx)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the settings body is not JSON", error_type="bad_settings") from None
    if call.kind == "settings" and not isinstance(value, dict):
        raise BadRequest("POST /settings takes a JSON object", error_type="bad_settings")
    # Read-modify-write under the file's lock: concurrent changes by the same user (the
    # frontend sends several at startup, possibly through several replicas) must not undo
    # each other.
    async with hold_all(request.app[USERDATA].settings_locks, keys):
        current = await _read_settings(request, ctx, upstream, target)
        if call.kind == "settings":
            assert isinstance(value, dict)
            current.update(value)
        else:
            current[call.setting_id] = value
        written = await _exchange(
            request,
            ctx,
            upstream,
            "POST",
            f"{target}?overwrite=true",
            body=orjson.dumps(current, option=orjson.OPT_INDENT_2),
            content_type="application/json",
        )
    if written.status != 200:
        raise UpstreamUnavailable(
            f"ComfyUI refused to store the settings ({written.status})",
            error_type="settings_not_stored",
        )
    ctx.bytes_out = 0
    return web.Response(status=200)


async def _read_settings(
    request: web.Request, ctx: RequestContext, upstream: Upstream, target: str
) -> dict[str, object]:
    answer = await _exchange(request, ctx, upstream, "GET", target)
    if answer.status == 404:
        return {}
    if answer.status != 200:
        raise UpstreamUnavailable(
            f"ComfyUI did not give the settings ({answer.status})", error_type="settings_unreadable"
        )
    try:
        current = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        current = None
    if not isinstance(current, dict):
        raise UpstreamUnavailable(
            "the stored comfy.settings.json is not a JSON object", error_type="settings_unreadable"
        )
    return current
