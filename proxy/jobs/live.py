"""The jobs API's own WebSocket to each ComfyUI instance: live node, progress and previews.

ComfyUI sends a prompt's events (``execution_start``, ``executing``, ``progress``,
``executed``, previews, the end) only to the socket registered under the prompt's
``client_id``. Jobs are submitted with a client id of this process
(:attr:`LiveWatcher.client_id`, namespaced per owner by isolation like any client's), and
before a submit the watcher makes sure a socket under the id ComfyUI will see is open on
every reachable instance. Its frames feed :class:`~proxy.jobs.live_store.LiveJobs` (so every
replica's ``GET /jobs/{id}`` and event stream show the progress) and the job watcher (the
final ``executing {node: null}`` - sent after ComfyUI wrote the history - records the end at
once: webhook, cache, count).

Why a client id per process: ComfyUI keeps one socket per id and drops the id when *any*
socket of it closes; two replicas sharing an id would take each other's events away. A job
of a replica that restarted loses its live progress (its end is still found by the periodic
watcher, on any replica).

Previews: with no ``prompt_id`` on the wire (binary type 1), a preview belongs to the prompt
executing on this socket: ComfyUI sends previews only to the running prompt's client id,
which here is one of this process's job ids (per owner with isolation) - nobody else's.

Each socket is a supervised task (:class:`~proxy.tasks.Supervised`): a failure or a lost
socket is logged, counted (``comfygate_task_failures_total{task="jobs_live"}``) and the
socket opened again with back-off; one idle for ``IDLE_SECONDS`` closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import uuid
from typing import Any, Final

import orjson
import structlog
from aiohttp import WSMsgType, hdrs
from prometheus_client import Counter

from proxy.jobs.live_store import LiveJobs
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.watcher import JobWatcher
from proxy.tasks import Supervised
from proxy.tenancy.events import PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA
from proxy.tenancy.namespaces import upstream_client_id
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.jobs")

IDLE_SECONDS: Final = 120.0
CONNECT_WAIT_SECONDS: Final = 5.0
"""Longest a submit waits for the sockets (then it goes on: progress is best effort)."""
MAX_MESSAGE: Final = 64 * 1024 * 1024
_IMAGE_TYPES: Final = {1: "image/jpeg", 2: "image/png", 3: "image/webp"}
_HEADER: Final = struct.Struct(">II")


class SocketLost(Exception):
    """The instance closed the watcher's socket (restarted with back-off)."""


class _Socket:
    def __init__(self, owner: LiveWatcher, upstream: Upstream, sid: str) -> None:
        self.owner = owner
        self.upstream = upstream
        self.sid = sid
        self.connected = asyncio.Event()
        self.last_used = time.monotonic()
        self.running: str | None = None
        """The prompt executing on this socket (owner of type 1 previews)."""
        self.states: dict[str, dict[str, Any]] = {}
        self.handle = Supervised(
            self._run,
            name="jobs_live",
            failures=owner.failures,
            logger=log,
            max_delay=10.0,
        )

    async def _run(self) -> None:
        watcher = self.owner
        self.connected.clear()
        try:
            async with watcher.pool.session.ws_connect(
                self.upstream.ws_url_for(f"/ws?clientId={self.sid}"),
                headers={hdrs.HOST: self.upstream.host_header},
                max_msg_size=MAX_MESSAGE,
                autoping=True,
                compress=0,
            ) as ws:
                self.connected.set()
                while True:
                    try:
                        msg = await ws.receive(timeout=watcher.idle_seconds / 4)
                    except TimeoutError:
                        if self._idle():
                            watcher.forget(self)
                            return
                        continue
                    if msg.type == WSMsgType.TEXT:
                        await self._text(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        await self._binary(msg.data)
                    elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
                        if self._idle():
                            watcher.forget(self)
                            return
                        raise SocketLost(f"{self.upstream.name} closed the socket")
        finally:
            self.connected.clear()

    def _idle(self) -> bool:
        return self.running is None and time.monotonic() - self.last_used > self.owner.idle_seconds

    async def _text(self, frame: str) -> None:
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return
        kind, data = message.get("type"), message["data"]
        prompt_id = data.get("prompt_id")
        if not isinstance(kind, str) or not isinstance(prompt_id, str):
            return
        self.last_used = time.monotonic()
        self.owner.metrics.live_events.labels(kind).inc()
        state = self.states.setdefault(prompt_id, {"node": None, "progress": None, "preview": 0})
        if kind == "execution_start":
            self.running = prompt_id
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                # After ComfyUI wrote the history: the end is readable now.
                if self.running == prompt_id:
                    self.running = None
                self.states.pop(prompt_id, None)
                self.owner.spawn(self.owner.watcher.end_seen(prompt_id))
                return
            self.running = prompt_id
            state["node"] = str(node)
        elif kind == "progress":
            value, top = data.get("value"), data.get("max")
            if isinstance(value, int | float) and isinstance(top, int | float):
                node = data.get("node")
                state["progress"] = {
                    "node": str(node) if node is not None else state["node"],
                    "value": value,
                    "max": top,
                }
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            if self.running == prompt_id:
                self.running = None
            return
        else:
            return
        await self.owner.live.put(prompt_id, state)

    async def _binary(self, frame: bytes) -> None:
        if len(frame) < 8 or self.owner.preview_max_bytes <= 0:
            return
        kind = int.from_bytes(frame[:4], "big")
        if kind == PREVIEW_IMAGE:
            prompt_id = self.running
            mime = _IMAGE_TYPES.get(int.from_bytes(frame[4:8], "big"), "image/jpeg")
            image = frame[8:]
        elif kind == PREVIEW_IMAGE_WITH_METADATA:
            _, length = _HEADER.unpack_from(frame)
            try:
                meta = orjson.loads(frame[8 : 8 + length])
            except orjson.JSONDecodeError:
                return
            prompt_id = meta.get("prompt_id") if isinstance(meta, dict) else None
            mime = str(meta.get("image_type") or "image/png") if isinstance(meta, dict) else ""
            image = frame[8 + length :]
        else:
            return
        if not isinstance(prompt_id, str) or len(image) > self.owner.preview_max_bytes:
            return
        self.owner.metrics.live_events.labels("preview").inc()
        await self.owner.live.put_preview(prompt_id, mime, image)
        state = self.states.setdefault(prompt_id, {"node": None, "progress": None, "preview": 0})
        state["preview"] = int(state.get("preview", 0)) + 1
        await self.owner.live.put(prompt_id, state)


class LiveWatcher:
    def __init__(
        self,
        *,
        pool: UpstreamPool,
        live: LiveJobs,
        watcher: JobWatcher,
        metrics: JobMetrics,
        failures: Counter | None,
        isolation: bool,
        preview_max_bytes: int,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.pool = pool
        self.live = live
        self.watcher = watcher
        self.metrics = metrics
        self.failures = failures
        self.isolation = isolation
        self.preview_max_bytes = preview_max_bytes
        self.idle_seconds = idle_seconds
        self.client_id = f"comfygate-jobs-{uuid.uuid4().hex[:16]}"
        """The ``client_id`` this process's jobs are submitted with."""
        self._sockets: dict[tuple[str, str], _Socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def sid(self, owner: str) -> str:
        """The id ComfyUI sees for ``owner``'s jobs (isolation namespaces client ids)."""
        return upstream_client_id(owner, self.client_id) if self.isolation else self.client_id

    async def prepare(self, owner: str) -> None:
        """A socket under ``owner``'s job id open on every reachable instance. A socket
        opened now is waited for (up to ``CONNECT_WAIT_SECONDS``: the submit then goes on,
        its progress unknown); one already there, even reconnecting, is not (a flapping
        instance must not slow every submit down)."""
        sid = self.sid(owner)
        waits = []
        for upstream in self.pool.reachable():
            sock = self._sockets.get((upstream.name, sid))
            if sock is None or not sock.handle.running:
                sock = self._sockets[(upstream.name, sid)] = _Socket(self, upstream, sid)
                sock.handle.start()
                waits.append(asyncio.ensure_future(sock.connected.wait()))
            sock.last_used = time.monotonic()
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=CONNECT_WAIT_SECONDS)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("jobs_live_not_connected", sockets=len(pending))

    def forget(self, sock: _Socket) -> None:
        key = (sock.upstream.name, sock.sid)
        if self._sockets.get(key) is sock:
            del self._sockets[key]

    def spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(self._quietly(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, work: Any) -> None:
        try:
            await work
        except Exception:
            log.exception("jobs_live_end_failed")
            if self.failures is not None:
                self.failures.labels("jobs_live").inc()

    async def close(self) -> None:
        sockets = list(self._sockets.values())
        self._sockets.clear()
        for sock in sockets:
            await sock.handle.stop()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["LiveWatcher"]
