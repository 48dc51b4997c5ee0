"""``SubmitGuard``: tenant isolation on what users send and fetch (``/prompt``, uploads, ``/view``).

Runs after the role guard on the rules ``prompt``, ``upload`` and ``view``. Admins pass
untouched (their prompts are still recorded as theirs); with ``isolation.enabled = false``
every request passes.

- ``POST /prompt``: :mod:`proxy.isolation.prompt` checks and rewrites the canonical prompt
  (:mod:`proxy.comfy`: the proxy's one reading, forwarded as it serialises it); the prompt is
  recorded as the caller's *before* it is forwarded (ComfyUI may send its events before its
  answer) and forgotten again if ComfyUI refuses it. It is counted against the caller's queue
  quota first (:mod:`proxy.limits.quota.service`; over it: 429 ``queue_full``).
- ``POST /upload/image|mask``: the multipart body is rebuilt while it streams (the file part is
  never buffered) so the file lands in the caller's folder of input/ (``users/<owner>-<tag>/``,
  :mod:`proxy.tenancy.namespaces`); the stored file is recorded as
  the caller's from ComfyUI's answer.
- ``GET /view``: only the caller's folder, shared input folders and files recorded as the
  caller's; anything else is a 404 that looks like a missing file. ``/view_metadata`` and the
  ``blake3:`` asset form are admin-only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
import redis.asyncio as redis
import structlog
from aiohttp import BodyPartReader, MultipartReader, hdrs, web

from proxy.comfy.records import PromptRecord
from proxy.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, ProxyError
from proxy.isolation.prompt import (
    PromptRejected,
    check_graph,
    client_id_of,
    requested_prompt_id,
    rewrite_submission,
)
from proxy.limits.quota.service import QueueQuota
from proxy.observability.metrics import role_label
from proxy.request.prompt import forward_submission, read_prompt
from proxy.settings import IsolationSettings
from proxy.settings.auth import RoleSettings
from proxy.state import RequestContext
from proxy.tenancy.attribution import preview_node_ids
from proxy.tenancy.files import (
    FileScope,
    FileTarget,
    PathRefused,
    clean_relative,
    closing,
    field_part,
    file_part_head,
    is_asset_hash,
    original_ref_target,
    safe_field_name,
    upload_filename,
    upload_subfolder,
    view_target,
)
from proxy.tenancy.namespaces import FolderNames, upstream_client_id
from proxy.tenancy.ownership import OwnershipStore
from proxy.upstream.pool import UpstreamPool

ResponseRewrite = Callable[[int, bytes], Awaitable[bytes]]

log = structlog.get_logger("comfygate.isolation")

FIELD_LIMIT = 64 * 1024
"""Largest non-file form field read (ComfyUI's fields are short: type, subfolder, original_ref)."""
MAX_FIELDS = 64
CHUNK = 256 * 1024
FILE_FIELD = "image"
"""The form field ComfyUI reads the uploaded file from."""
REWRITTEN_FIELDS = frozenset({"type", "subfolder"})
"""Set by the proxy (the client's values are checked, then replaced)."""
_PART_HEADERS_KEPT = (hdrs.CONTENT_TYPE, hdrs.CONTENT_TRANSFER_ENCODING, hdrs.CONTENT_ENCODING)


class HiddenNotFound(NotFound):
    """A file the caller may not see: answered like ComfyUI's 404 for a missing file.

    ``empty_body`` asks ``chain`` to send no body (ComfyUI's own 404 is empty), so the answer
    does not tell a hidden file from a missing one.
    """

    error_type = "not_found"
    empty_body = True

    def __init__(self) -> None:
        super().__init__("Not Found")


class SubmitGuard:
    """What the per-operation submit guards share: their collaborators, built once
    (``app.build_routes``), and the caller's file scope."""

    name = "isolation"

    def __init__(
        self,
        *,
        roles: Mapping[str, RoleSettings],
        isolation: IsolationSettings,
        ownership: OwnershipStore,
        folders: FolderNames,
        pool: UpstreamPool,
        quota: QueueQuota | None = None,
    ) -> None:
        self.roles = roles
        self.isolation = isolation
        self.ownership = ownership
        self.folders = folders
        self.pool = pool
        self.quota = quota
        """Per-user queue quotas (None: not counted here)."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        """Each operation's guard decides (see the subclasses)."""
        raise NotImplementedError

    def _scope(self, ctx: RequestContext) -> tuple[FileScope, bool] | None:
        """The caller's file scope and whether it is an admin; None with isolation off."""
        principal = ctx.principal
        if not self.isolation.enabled or principal is None:
            return None
        owner = principal.comfy_user
        scope = FileScope(owner, self.folders.of(owner), self.isolation.shared_input_folders)
        return scope, principal.is_admin(self.roles)


class PromptSubmitGuard(SubmitGuard):
    """``POST /prompt``: checked, rewritten, counted and recorded (admins': recorded only)."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if request.method != hdrs.METH_POST or (caller := self._scope(ctx)) is None:
            return
        scope, admin = caller
        if admin:
            await _record_admin_prompt(self, request, ctx, scope.owner)
            return
        await _submit_prompt(self, request, ctx, scope)


class UploadGuard(SubmitGuard):
    """``POST /upload/image|mask``: the file lands in the caller's folder."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        caller = self._scope(ctx)
        if request.method == hdrs.METH_POST and caller is not None and not caller[1]:
            await _rewrite_upload(request, ctx, self.ownership, caller[0])


class ViewGuard(SubmitGuard):
    """``/view``, ``/view_metadata``: only the caller's files and shared input folders."""

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        caller = self._scope(ctx)
        if caller is not None and not caller[1]:
            await _check_view(request, ctx, self.ownership, caller[0])


async def _owned(store: OwnershipStore, ref: tuple[str, str, str] | None, owner: str) -> bool:
    return ref is not None and await store.file_owner(ref) == owner


# -- POST /prompt ------------------------------------------------------------------------------


async def _submit_prompt(
    guard: SubmitGuard, request: web.Request, ctx: RequestContext, scope: FileScope
) -> None:
    store = guard.ownership
    submission = await read_prompt(request, ctx)  # the proxy's one reading, typed and checked
    if submission.prompt is None:
        return  # ComfyUI answers no_prompt; nothing can run
    body = submission.body
    violations = check_graph(submission.prompt, scope)  # filename_prefix moved in place
    violations = [v for v in violations if not await _owned(store, v.ref, scope.owner)]
    if violations:
        raise PromptRejected(violations)
    # SECURITY: a known id is refused whoever owns it (the record's SET NX below decides, in
    # one step); ComfyUI would overwrite that history entry (and its outputs' attribution), and
    # the answer must not say whose it is.
    prompt_id = requested_prompt_id(body) or str(uuid.uuid4())
    client_id = _namespaced(scope.owner, body)
    roles = guard.roles
    principal = ctx.principal
    may_prioritise = principal is not None and any(
        roles[r].priority for r in principal.roles if r in roles
    )
    submission.body = rewrite_submission(
        body,
        prompt_id=prompt_id,
        client_id=client_id,
        may_prioritise=may_prioritise,
    )
    record = PromptRecord(
        prompt_id=prompt_id,
        owner=scope.owner,
        upstream=(ctx.target or guard.pool.home()).name,  # placement chose it
        client_id=client_id or "",
        sent_client_id=client_id_of(body),
        created_at=time.time(),
        role=role_label(principal.roles) if principal is not None else "",
        # The nodes whose temp/ previews may become the caller's: read from the graph that is
        # forwarded, never from what ComfyUI later reports (proxy.tenancy.attribution).
        previews=preview_node_ids(
            ((n.id, n.class_type) for n in submission.prompt.nodes.values()),
            guard.isolation.preview_nodes,
        ),
    )
    # Counted against the caller's queue quota (over it: 429 queue_full) and recorded as the
    # caller's before forwarding (ComfyUI may emit the prompt's events before it answers).
    if not await _count_and_record(guard, ctx, record):
        raise _taken()  # another request recorded the same id
    forward_submission(ctx, submission)
    ctx.response_filters.append(_forget_if_refused(store, prompt_id))


async def _record_admin_prompt(
    guard: SubmitGuard, request: web.Request, ctx: RequestContext, owner: str
) -> None:
    """An admin's prompt: only its client id namespaced (the WebSocket relay namespaces every
    socket's, admins' too) and an id minted when it has none; then recorded as the admin's."""
    submission = await read_prompt(request, ctx)
    body = submission.body
    prompt_id = body.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        prompt_id = str(uuid.uuid4())
    client_id = _namespaced(owner, body)
    submission.body = rewrite_submission(
        body, prompt_id=prompt_id, client_id=client_id, may_prioritise=True
    )
    forward_submission(ctx, submission)
    record = PromptRecord(
        prompt_id=prompt_id,
        owner=owner,
        upstream=(ctx.target or guard.pool.home()).name,  # placement chose it
        client_id=client_id or "",
        sent_client_id=client_id_of(body),
        created_at=time.time(),
        role=role_label(ctx.principal.roles) if ctx.principal is not None else "",
    )
    # Admins' quota is 0 (unlimited) unless configured; a known id is theirs to reuse.
    if await _count_and_record(guard, ctx, record, release_if_taken=False):
        store = guard.ownership
        ctx.response_filters.append(_forget_if_refused(store, prompt_id))


def _namespaced(owner: str, body: dict[str, Any]) -> str | None:
    """The client id ComfyUI gets for the prompt: the namespaced form of the client's, or None
    when it sent none (the prompt's events are then broadcast, and kept in the tenant by the
    WebSocket filter: every socket of the submitter gets them, as with ComfyUI alone)."""
    sent = client_id_of(body)
    return upstream_client_id(owner, sent) if sent else None


async def _count_and_record(
    guard: SubmitGuard,
    ctx: RequestContext,
    record: PromptRecord,
    *,
    release_if_taken: bool = True,
) -> bool:
    """Reserve ``record``'s prompt in the caller's queue quota and record it as theirs, at once:
    two independent writes (different Redis keys, slots on a cluster), so they travel together
    and cost one round trip, not two. Whether the record was written (False: the id is known).

    Each write is undone if the other refuses, so that nothing is left counted or owned for a
    prompt that is not forwarded: a refused reservation forgets the record just written (the
    id is this request's, nobody else saw it), and a taken id releases the reservation unless
    ``release_if_taken`` is False (an admin's prompt goes ahead with a known id).

    Raises:
        QueueFull, BadRequest, QuotaUnavailable: the quota refused (see ``QueueQuota.reserve``).
        redis.RedisError, OSError: the record could not be written.
    """
    quota, store = guard.quota, guard.ownership
    principal = ctx.principal
    if quota is None or principal is None or not quota.tracks(principal):
        return await store.record_prompt(record)
    counted, recorded = await asyncio.gather(
        quota.reserve(ctx, principal, record.prompt_id, record.upstream),
        store.record_prompt(record),
        return_exceptions=True,
    )
    if recorded is True and isinstance(counted, BaseException):
        await _forget_quietly(store, record.prompt_id)
    elif recorded is not True and counted is True and (release_if_taken or recorded is not False):
        await quota.release([record.prompt_id], reason="taken")
    if recorded is False and release_if_taken:
        return False  # taken decides: as if the id had been checked first
    if isinstance(counted, BaseException):
        raise counted
    if isinstance(recorded, BaseException):
        raise recorded
    return recorded


async def _forget_quietly(store: OwnershipStore, prompt_id: str) -> None:
    """Undo a record made for a prompt that is not forwarded. A failure leaves an id owned by
    the caller that never ran (it expires with the retention); the quota's refusal stands."""
    try:
        await store.forget_prompt(prompt_id)
    except (redis.RedisError, OSError):
        log.warning("ownership_forget_failed", prompt_id=prompt_id)


def _taken() -> BadRequest:
    return BadRequest(
        "prompt_id is already in use; omit it to get a new one", error_type="prompt_id_taken"
    )


def _forget_if_refused(store: OwnershipStore, prompt_id: str) -> ResponseRewrite:
    async def rewrite(status: int, body: bytes) -> bytes:
        if status != 200:
            await store.forget_prompt(prompt_id)  # not queued: the id is free again
        return body

    return rewrite


# -- GET /view ---------------------------------------------------------------------------------


async def _check_view(
    request: web.Request, ctx: RequestContext, store: OwnershipStore, scope: FileScope
) -> None:
    if ctx.path != "/view":
        raise Forbidden("model metadata is for admins", error_type="forbidden_role")
    query = request.query
    for key in ("filename", "subfolder", "type"):
        if len(query.getall(key, ())) > 1:
            raise BadRequest(f"{key} given more than once", error_type="invalid_path")
    filename = query.get("filename")
    if filename is None:
        raise HiddenNotFound()  # ComfyUI: 404
    if is_asset_hash(filename):
        # SECURITY: newer ComfyUI serves any asset by hash, whoever stored it.
        raise Forbidden("files by asset hash are for admins", error_type="forbidden_role")
    try:
        target = view_target(filename, query.get("type"), query.get("subfolder"))
    except PathRefused as exc:
        raise BadRequest(f"invalid file path: {exc}", error_type="invalid_path") from None
    if not scope.may_read(target.kind, target.folder) and not await _owned(
        store, target.ref, scope.owner
    ):
        raise HiddenNotFound()
    # ComfyUI gets the query as the proxy parsed it (``ctx.upstream_path`` is the proxy's own
    # encoding of ``request.query``, see proxy.target), without the credentials the auth
    # guard removed: no second parser may read a different filename or subfolder.


# -- POST /upload/image, /upload/mask ----------------------------------------------------------


async def _rewrite_upload(
    request: web.Request, ctx: RequestContext, store: OwnershipStore, scope: FileScope
) -> None:
    if request.content_type != "multipart/form-data":
        raise BadRequest("uploads must be multipart/form-data", error_type="bad_upload")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError):
        raise BadRequest("malformed multipart body", error_type="bad_upload") from None
    upload = _UploadRewrite(ctx, store, scope, mask=ctx.path == "/upload/mask")
    await upload.read_head(reader)  # refusals in fields before the file: nothing sent yet
    ctx.body_stream = upload.stream(reader)
    ctx.upstream_headers[hdrs.CONTENT_TYPE] = f"multipart/form-data; boundary={upload.boundary}"
    ctx.response_filters.append(_record_upload(store, scope))


class _UploadRewrite:
    """Rebuilds an upload's multipart body: fields checked, ``type``/``subfolder`` replaced.

    Fields before the file part are read (small, bounded) before anything is forwarded. Fields
    after it (the stock UI sends ``image`` first) are checked while streaming: a refusal then
    aborts the upstream request mid-body, so ComfyUI, which reads the whole form before doing
    anything, stores nothing.
    """

    def __init__(
        self, ctx: RequestContext, store: OwnershipStore, scope: FileScope, *, mask: bool
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.scope = scope
        self.mask = mask
        self.boundary = f"comfygate-{uuid.uuid4().hex}"
        self.subfolder: str | None = None
        self.fields = 0
        self.head = bytearray()
        self.file_part: BodyPartReader | None = None
        self.file_name = ""

    async def read_head(self, reader: MultipartReader) -> None:
        """Read and check the parts before the file part."""
        while (part := await _next_part(reader)) is not None:
            if part.name == FILE_FIELD:
                self._take_file(part)
                return
            self.head += await self._field(part)

    async def stream(self, reader: MultipartReader) -> AsyncIterator[bytes]:
        """The rewritten body, streamed; raises a Rejection on a late bad field."""
        try:
            yield bytes(self.head)
            if self.file_part is not None:
                yield file_part_head(
                    self.boundary,
                    FILE_FIELD,
                    self.file_name,
                    [(k, v) for k in _PART_HEADERS_KEPT if (v := self.file_part.headers.get(k))],
                )
                while chunk := await self.file_part.read_chunk(CHUNK):
                    self.ctx.bytes_in += len(chunk)
                    yield chunk
                yield b"\r\n"
            tail = bytearray()
            while (part := await _next_part(reader)) is not None:
                if part.name == FILE_FIELD:
                    raise BadRequest("one file per upload", error_type="bad_upload")
                tail += await self._field(part)
            subfolder = upload_subfolder(self.scope, self.subfolder or "")
            tail += field_part(self.boundary, "type", "input")
            tail += field_part(self.boundary, "subfolder", subfolder)
            yield bytes(tail) + closing(self.boundary)
        except ProxyError:
            self.ctx.rejected_by = SubmitGuard.name
            raise

    def _take_file(self, part: BodyPartReader) -> None:
        try:
            self.file_name = upload_filename(part.filename or "")
        except PathRefused as exc:
            raise BadRequest(f"invalid file name: {exc}", error_type="invalid_path") from None
        self.file_part = part

    async def _field(self, part: BodyPartReader) -> bytes:
        """Check one non-file part; the bytes to forward for it (none for replaced ones)."""
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise BadRequest("too many form fields", error_type="bad_upload")
        name = part.name
        if name is None or not safe_field_name(name):
            raise BadRequest("form field without a usable name", error_type="bad_upload")
        if part.filename is not None:
            return b""  # a file in another field: ComfyUI would ignore it
        value = await _read_field(part)
        if name == "type":
            if value != "input":
                raise Forbidden(
                    "uploads go to your input folder; type must be input",
                    error_type="upload_type_forbidden",
                )
            return b""
        if name == "subfolder":
            try:
                upload_subfolder(self.scope, value)
            except PathRefused as exc:
                raise BadRequest(f"invalid subfolder: {exc}", error_type="invalid_path") from None
            if self.subfolder is None:
                self.subfolder = value  # ComfyUI reads the first one
            return b""
        if name == "original_ref":
            if not self.mask:
                return b""  # only /upload/mask reads it
            await self._check_original_ref(value)
        return field_part(self.boundary, name, value)

    async def _check_original_ref(self, raw: str) -> None:
        try:
            target: FileTarget = original_ref_target(raw)
        except PathRefused as exc:
            raise BadRequest(f"invalid original_ref: {exc}", error_type="invalid_path") from None
        if self.scope.may_read(target.kind, target.folder):
            return
        if await _owned(self.store, target.ref, self.scope.owner):
            return
        raise Forbidden(
            "original_ref must be one of your files", error_type="original_ref_forbidden"
        )


async def _next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        part = await reader.next()
    except (ValueError, RuntimeError, AssertionError):
        raise BadRequest("malformed multipart body", error_type="bad_upload") from None
    if part is not None and not isinstance(part, BodyPartReader):
        raise BadRequest("nested multipart is not accepted", error_type="bad_upload")
    return part


async def _read_field(part: BodyPartReader) -> str:
    """A text field's value, decoded as ComfyUI's ``request.post()`` would."""
    raw = bytearray()
    while chunk := await part.read_chunk(8192):
        raw += chunk
        if len(raw) > FIELD_LIMIT:
            raise PayloadTooLarge(f"form field {part.name!r} is over {FIELD_LIMIT} bytes")
    try:
        data = bytes(part.decode(bytes(raw)))
        content_type = part.headers.get(hdrs.CONTENT_TYPE)
        charset = "utf-8"
        if content_type is None or content_type.startswith("text/"):
            charset = part.get_charset(default="utf-8")
        return data.decode(charset)
    except (LookupError, ValueError, RuntimeError):
        raise BadRequest(f"form field {part.name!r} is not text", error_type="bad_upload") from None


def _record_upload(store: OwnershipStore, scope: FileScope) -> ResponseRewrite:
    """Record the stored file (``{"name", "subfolder", "type"}``) as the caller's."""

    async def rewrite(status: int, body: bytes) -> bytes:
        if status != 200:
            return body
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if not isinstance(answer, dict):
            return body
        name, subfolder = answer.get("name"), answer.get("subfolder", "")
        if isinstance(name, str) and isinstance(subfolder, str):
            try:
                folder = clean_relative(subfolder)
            except PathRefused:
                return body
            if answer.get("type", "input") == "input" and scope.owns(folder):
                await store.record_files(scope.owner, [("input", folder, name)])
        return body

    return rewrite
