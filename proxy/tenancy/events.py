"""Which of ComfyUI's WebSocket frames a tenant's socket may see.

The frames: docs/comfyui-protocol.md#server-to-client-json-messages and
docs/comfyui-protocol.md#binary-frames.

One :class:`SocketEventFilter` per relayed socket is appended to ``ctx.frame_filters``; the relay
passes every frame ComfyUI sends on that socket through it, and a ``None`` drops the frame.

Rules, for a non-admin caller:

* JSON events carrying ``data.prompt_id`` pass iff the prompt is the caller's (an ownership
  lookup, cached per socket). Of an ``executed`` output only the previews of the prompt's own
  preview nodes are recorded as the caller's files (:mod:`proxy.tenancy.attribution`): the
  output is the node's to write, and a node may echo any file name it was given.
* ``status`` passes, its connect-time ``sid`` (the namespaced id ComfyUI saw) mapped back to the
  client's own id; the types in ``isolation.passed_event_types`` pass; so does the connect-time
  ``executing`` without a prompt id (ComfyUI sends it only to the sid whose prompt runs).
* ``logs`` only for admins. Anything else that cannot be attributed is dropped.
* Binary type 4 (preview with metadata): pass iff its metadata ``prompt_id`` is the caller's.
* Binary types 1 and 3 carry no prompt id: they pass only while one of the caller's prompts is
  executing as seen on this socket (from any of its :data:`WINDOW_EVENTS` to its
  ``execution_success``, ``execution_error``, ``execution_interrupted`` or final
  ``executing {node: null}``). ComfyUI runs one prompt at a time, so frames in that window are
  the caller's; a window event of a prompt that is not (or cannot be told to be) the caller's
  closes the window at once, and so does every ``status`` (sent whenever the queue changes).

Prompts submitted without a ``client_id`` (:mod:`proxy.isolation.prompt`) are broadcast by
ComfyUI to every socket, and only their ``progress``, ``progress_state``, previews and final
``executing {node: null}`` (ComfyUI sends the others to a client id only): the rules above
deliver them to every socket of the submitter and drop them everywhere else (a broadcast within
the tenant), and their progress events open the preview window.

For admins only the ``sid`` is mapped back: everything else passes untouched.

When the ownership store fails (Redis down or slow), the relay goes on (issue 14): a frame
whose owner could not be looked up is dropped, as one that is not the caller's (SECURITY:
default deny, never deliver what could not be attributed; the answer is not cached, so the
prompt's next frame asks again). Holding such frames until Redis answers was rejected: it would
stall every later frame of the socket behind them, or reorder them. What the caller missed is
in ``/history`` and ``/queue``, which the frontend reads again. Preview files of the caller's
own prompt that could not be recorded are kept (bounded) and recorded with the next
``executed`` or end event of the caller's; the frame itself, the caller's, is delivered. Each
failure is counted in ``comfygate_redis_errors_total{op="ws_owner"|"ws_files"}`` (anything
other than a Redis error in ``comfygate_task_failures_total{task="ws_filter"}``) and logged
once per outage per socket, and again with the number of failures when the store answers.

Cost: text frames are parsed once with orjson and passed on as the *same* string unless the sid
is rewritten; binary previews are never copied, a type 4 frame only has its small metadata
header parsed.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as redis
import structlog

from proxy.comfy.frames import END_EVENTS
from proxy.comfy.records import FileRef, PromptRecord
from proxy.relay.ws_fast import UNDECIDED, Undecided
from proxy.tenancy.attribution import preview_files
from proxy.tenancy.ownership import OwnershipStore

if TYPE_CHECKING:
    from proxy.observability.metrics import Metrics

log = structlog.get_logger("comfygate.isolation")

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
_HEADER = struct.Struct(">II")
WINDOW_EVENTS = frozenset({"execution_start", "executing", "progress", "progress_state"})
"""Events of a prompt that is executing now (``executing`` with a node)."""
ADMIN_ONLY_EVENTS = frozenset({"logs"})
"""Server log lines (prompts, paths, errors of everyone): admins only, whatever is configured."""
OWNER_CACHE_SIZE = 4096
UNRECORDED_FILES_MAX = 1024
"""Preview files of the caller's kept for a later attempt while the store fails."""
_UNKNOWN_RUNNING = "\0connect-time"
"""Running prompt of this socket announced by the connect-time ``executing`` (id unknown)."""

FileRecorder = Callable[[list[FileRef]], Awaitable[None]]


class SocketEventFilter:
    """The frame filter of one relayed socket (an ``async`` callable, see the module doc)."""

    def __init__(
        self,
        *,
        owner: str,
        client_id: str,
        upstream_client_id: str,
        ownership: OwnershipStore,
        passed_types: Collection[str],
        admin: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.owner = owner
        self.client_id = client_id
        self.upstream_client_id = upstream_client_id
        self.admin = admin
        self._ownership = ownership
        self._passed = _passed_set(tuple(passed_types))
        self._owned: dict[str, PromptRecord | None] = {}
        """Prompt id -> its record if it is the caller's, else None."""
        self.running: str | None = None
        """The caller's prompt executing as seen on this socket (gates binary types 1 and 3)."""
        self._metrics = metrics
        self._failures = 0
        """Store failures since its last answer (0: it answers)."""
        self._unrecorded: list[FileRef] = []
        """The caller's preview files the store failed to record, for a later attempt."""
        self._last_meta: tuple[bytes, str | None] = (b"", None)
        """The last type 4 metadata seen and its prompt id (a prompt's previews repeat it)."""

    async def __call__(self, frame: str | bytes) -> str | bytes | None:
        if isinstance(frame, str):
            return await self._text(frame)
        if self.admin:
            return frame
        return await self._binary(frame)

    def quick(self, frame: str | bytes) -> str | bytes | Undecided | None:
        """The decision for frames that need no lookup and no parse (``proxy.relay.ws_fast``):
        an admin's frames without a ``sid``, binary types 1 and 3 (the execution window), type 4
        previews of a prompt whose owner this socket knows. No effects: the relay may still
        call the filter in full for the same frame."""
        if isinstance(frame, str):
            return frame if self.admin and '"sid"' not in frame else UNDECIDED
        if self.admin:
            return frame
        if len(frame) < 4:
            return None
        kind = int.from_bytes(frame[:4], "big")
        if kind in (PREVIEW_IMAGE, TEXT):
            return frame if self.running is not None else None
        if kind != PREVIEW_IMAGE_WITH_METADATA:
            return None  # unknown binary types cannot be attributed
        prompt_id = self._preview_prompt_id(frame)
        if prompt_id is None:
            return None
        if prompt_id not in self._owned:
            return UNDECIDED  # the owner is looked up by the full call
        return frame if self._owned[prompt_id] is not None else None

    def _preview_prompt_id(self, frame: bytes) -> str | None:
        """:func:`preview_prompt_id`, with the last metadata remembered: a prompt's previews
        repeat theirs, so a repeat costs a comparison of a few dozen bytes, not a parse."""
        if len(frame) < _HEADER.size:
            return None
        _, length = _HEADER.unpack_from(frame)
        end = _HEADER.size + length
        if end > len(frame):
            return None
        metadata = frame[_HEADER.size : end]
        last, prompt_id = self._last_meta
        if metadata != last:
            prompt_id = _metadata_prompt_id(metadata)
            self._last_meta = (metadata, prompt_id)
        return prompt_id

    # -- ownership ------------------------------------------------------------------------
    async def owns(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` is the caller's; cached (owners never change) and bounded."""
        return await self.own_record(prompt_id) is not None

    async def own_record(self, prompt_id: str) -> PromptRecord | None:
        """The record of ``prompt_id`` if it is the caller's (cached like :meth:`owns`)."""
        if prompt_id in self._owned:
            return self._owned[prompt_id]
        try:
            record = await self._ownership.prompt(prompt_id)
        except Exception as exc:  # noqa: BLE001 - any failure: not attributed, never cached
            self._store_failed("ws_owner", exc)
            return None  # SECURITY: default deny, the frame is dropped
        self._store_answered()
        mine = record if record is not None and record.owner == self.owner else None
        if len(self._owned) >= OWNER_CACHE_SIZE:
            self._owned.clear()
        self._owned[prompt_id] = mine
        return mine

    # -- text frames ----------------------------------------------------------------------
    async def _text(self, frame: str) -> str | None:
        if self.admin and '"sid"' not in frame:
            return frame  # admins: only the connect-time status needs a rewrite
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return frame if self.admin else None
        if not isinstance(message, dict):
            return frame if self.admin else None
        kind = message.get("type")
        data = message.get("data")
        if kind == "status":
            # ComfyUI broadcasts the queue's status when a prompt leaves the queue and when it
            # is done: a broadcast prompt (which has no end event) ends here; a running one of
            # the caller's reopens the window with its next progress event.
            self.running = None
        if kind == "status" and isinstance(data, dict) and "sid" in data:
            # The sid ComfyUI knows is the namespaced one; the client knows (and later sends
            # back as clientId / client_id) only its own.
            data["sid"] = self.client_id
            return orjson.dumps(message).decode()
        if self.admin:
            return frame
        if not isinstance(kind, str) or kind in ADMIN_ONLY_EVENTS:
            return None  # SECURITY: server logs carry everyone's prompts, paths and errors
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        if prompt_id is None:
            if kind in self._passed:
                return frame
            if kind == "executing" and isinstance(data, dict) and "prompt_id" not in data:
                # Connect-time: sent only to the sid whose prompt is executing, i.e. ours.
                if data.get("node") is not None:
                    self.running = self.running or _UNKNOWN_RUNNING
                return frame
            return None  # SECURITY: unattributable (custom-node broadcasts, display_component)
        record = await self.own_record(prompt_id) if isinstance(prompt_id, str) else None
        if record is None:
            if kind in WINDOW_EVENTS:
                # SECURITY: another prompt runs (a broadcast one reaches every socket): binary
                # previews from now on are not the caller's, whatever this socket missed.
                self.running = None
            return None  # SECURITY: someone else's prompt
        assert isinstance(data, dict)  # prompt_id came from it
        assert isinstance(prompt_id, str)
        self._track(kind, data, prompt_id)
        if kind == "executed":
            # SECURITY: never every file dict of the output (Preview3D echoes its inputs):
            # only what the prompt's own preview nodes wrote (proxy.tenancy.attribution).
            files = preview_files(data.get("node"), data.get("output"), record.previews)
            if files or self._unrecorded:
                await self._record(files)
        elif self._unrecorded and (
            kind in END_EVENTS or (kind == "executing" and data.get("node") is None)
        ):
            await self._record([])
        return frame

    async def _record(self, files: list[FileRef]) -> None:
        """Record ``files`` (and those a failure left over) as the caller's; on failure keep
        them for the caller's next ``executed`` or end event (the frame is delivered anyway:
        it is the caller's, and its files stay refused to everyone until recorded)."""
        pending = [*self._unrecorded, *files]
        try:
            await self._ownership.record_files(self.owner, pending)
        except Exception as exc:  # noqa: BLE001 - any failure: kept for a later attempt
            self._store_failed("ws_files", exc)
            if len(pending) > UNRECORDED_FILES_MAX:
                log.warning(
                    "ws_files_unrecorded",
                    owner=self.owner,
                    dropped=len(pending) - UNRECORDED_FILES_MAX,
                )
                pending = pending[-UNRECORDED_FILES_MAX:]
            self._unrecorded = pending
            return
        self._store_answered()
        if self._unrecorded:
            log.info("ws_files_recorded_late", owner=self.owner, files=len(self._unrecorded))
        self._unrecorded = []

    def _store_answered(self) -> None:
        if self._failures:
            log.info("ws_owner_store_recovered", owner=self.owner, failures=self._failures)
            self._failures = 0

    def _store_failed(self, op: str, exc: Exception) -> None:
        """Count (and, once per outage, log) a failure of the ownership store."""
        first = self._failures == 0
        self._failures += 1
        redis_failure = isinstance(exc, redis.RedisError | OSError | TimeoutError)
        if self._metrics is not None:
            if redis_failure:
                self._metrics.redis_errors.labels(op, _failure_kind(exc)).inc()
            else:
                self._metrics.task_failures.labels("ws_filter").inc()
        if not redis_failure:
            log.error("ws_filter_failed", op=op, owner=self.owner, exc_info=exc)
        elif first:
            log.warning("ws_owner_store_failed", op=op, owner=self.owner, error=repr(exc))

    def _track(self, kind: str, data: dict[str, Any], prompt_id: str) -> None:
        """Follow the caller's execution window on this socket (for binary types 1 and 3)."""
        if kind in END_EVENTS or (kind == "executing" and data.get("node") is None):
            if self.running in (prompt_id, _UNKNOWN_RUNNING):
                self.running = None
        elif kind in WINDOW_EVENTS:
            self.running = prompt_id

    # -- binary frames --------------------------------------------------------------------
    async def _binary(self, frame: bytes) -> bytes | None:
        if len(frame) < 4:
            return None
        kind = int.from_bytes(frame[:4], "big")
        if kind in (PREVIEW_IMAGE, TEXT):
            # SECURITY: no prompt id on the wire; ComfyUI executes one prompt at a time, so
            # only frames inside the caller's own execution window are the caller's.
            return frame if self.running is not None else None
        if kind == PREVIEW_IMAGE_WITH_METADATA:
            prompt_id = self._preview_prompt_id(frame)
            return frame if prompt_id is not None and await self.owns(prompt_id) else None
        return None  # unknown binary types cannot be attributed


@functools.lru_cache(maxsize=8)
def _passed_set(passed_types: tuple[str, ...]) -> frozenset[str]:
    """The passed event types, one set for every socket (not a copy per idle socket)."""
    return frozenset(passed_types) - ADMIN_ONLY_EVENTS


def _failure_kind(exc: Exception) -> str:
    """``comfygate_redis_errors_total``'s ``kind`` of a store failure."""
    if isinstance(exc, redis.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, redis.ConnectionError | OSError):
        return "connection"
    return "error"


def preview_prompt_id(frame: bytes) -> str | None:
    """The ``prompt_id`` in a type 4 frame's metadata (``uint32 4, uint32 len, JSON``)."""
    if len(frame) < _HEADER.size:
        return None
    _, length = _HEADER.unpack_from(frame)
    end = _HEADER.size + length
    if end > len(frame):
        return None
    return _metadata_prompt_id(frame[_HEADER.size : end])


def _metadata_prompt_id(raw: bytes) -> str | None:
    try:
        metadata = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    prompt_id = metadata.get("prompt_id") if isinstance(metadata, dict) else None
    return prompt_id if isinstance(prompt_id, str) else None


__all__ = ["SocketEventFilter", "preview_prompt_id"]
