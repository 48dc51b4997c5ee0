"""``FakeComfyUI``: an aiohttp app that speaks ComfyUI 0.3.64's HTTP + WebSocket protocol.

Routes are registered like ``PromptServer.add_routes``: every route twice (``/x`` and
``/api/x``, the ``/api`` ones first), the ``/internal`` sub-app unmirrored, then static
``/templates`` and ``/``. See the module docstrings for what each part imitates and which
capture in ``/work/shared/captures`` it was checked against.

Fake-only additions: the request log (:attr:`received`, :attr:`ws_received`), the
:meth:`hold`/:meth:`release`/:meth:`wait_held`/:meth:`wait_idle` test hooks,
:attr:`submit_hold` (a ``POST /prompt`` stopped until the test lets it go), and the
``/__fake__/`` control API used by the benchmark (``ws_stream``, ``reset``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import struct
import time
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import Any, cast

from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Middleware

from . import files, images, queue_routes, userdata
from . import frontend as frontend_module
from .executor import Executor
from .middleware import (
    Received,
    cache_control,
    compress_body,
    make_faults,
    make_origin_only,
    make_record,
    read_body,
)
from .nodes import NodeRegistry
from .paths import Paths
from .queue import PromptQueue
from .submit_hold import SubmitHold
from .websocket import (
    PREVIEW_IMAGE,
    PREVIEW_IMAGE_WITH_METADATA,
    SocketTable,
    encode_preview,
    encode_preview_with_metadata,
    websocket_handler,
)

__all__ = ["FakeComfyUI", "Received"]


class FakeComfyUI:
    """A faithful in-process ComfyUI stand-in (see the package docstring for the interface)."""

    def __init__(
        self,
        root: Path | str,
        *,
        frontend: bool | Path | str = False,
        origin_check: bool = True,
        sec_fetch_check: bool = True,
        max_upload_size: int = 100 * 1024 * 1024,
        multi_user: bool = False,
        strict_prompt_id: bool = False,
        preview_method: str = "latent2rgb",
        record: bool = True,
        nodes: Collection[str] | None = None,
        compress_responses: bool = False,
    ) -> None:
        """``nodes``: the node classes this instance has (default: every one the fake knows),
        as instances with different custom nodes installed. ``compress_responses``: as
        ComfyUI started with ``--enable-compress-response-body`` (``middleware.compress_body``)."""
        self.paths = Paths.create(Path(root))
        self.origin_check = origin_check
        self.sec_fetch_check = sec_fetch_check
        self.max_upload_size = int(max_upload_size)
        self.multi_user = multi_user
        self.strict_prompt_id = strict_prompt_id
        self.record = record
        self.compress_responses = compress_responses
        self.host = "127.0.0.1"
        self.port = 8188
        self.received: list[Received] = []
        self.ws_received: list[tuple[str, str, str | bytes]] = []
        self.logs: list[tuple[str, str]] = []
        self.log_subscribers: set[str] = set()
        self.web_root = frontend_module.frontend_root(frontend, self.paths.root)
        self.registry = NodeRegistry(self.paths)
        if nodes is not None:
            self.registry.classes = {k: v for k, v in self.registry.classes.items() if k in nodes}
        self.fail_prompts = 0
        """Fake-only: the next N ``POST /prompt`` answer 500 before anything is queued."""
        self.fail_status: int | None = None
        """Fake-only: every request answers this status (an instance that is sick)."""
        self.submit_hold = SubmitHold()
        """Fake-only: stop the next ``POST /prompt`` until the test lets it go."""
        self.socket_table = SocketTable()
        self.executor = Executor(
            self.registry, self.paths, self.socket_table, preview_method=preview_method
        )
        self.queue = PromptQueue(self.executor)
        self.userdata = userdata.UserData(self)
        self._all_ws: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self._runner: web.AppRunner | None = None
        self._ensure_example_input()
        self.log("ComfyUI version: 0.3.64 (fake)")
        self.log(f"[Prompt Server] web root: {self.web_root}")
        self.app = self._build_app()

    # -- public interface ---------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def sockets(self) -> dict[str, web.WebSocketResponse]:
        """ComfyUI's routing table ``sid -> socket`` (takeover semantics)."""
        return self.socket_table.sockets

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on a real TCP port; returns the bound port."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host = host
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def hold(self) -> None:
        """The worker stops after ``execution_cached`` of the next prompt, before any node."""
        self.queue.hold()

    def release(self) -> None:
        self.queue.release()

    async def wait_held(self) -> str:
        """Until a prompt waits at the hold gate; returns its prompt id."""
        return await self.queue.wait_held()

    async def wait_idle(self) -> None:
        """Until the queue is empty, nothing runs and the last messages were sent."""
        await self.queue.wait_idle()

    async def wait_socket(self, sid: str, *, flags: bool = False, gone: bool = False) -> None:
        """Until a socket is registered under ``sid`` (with ``flags``: and told its feature
        flags; with ``gone``: until none is)."""

        def ready() -> bool:
            if gone:
                return sid not in self.sockets
            told = self.socket_table.metadata.get(sid, {}).get("feature_flags")
            return sid in self.sockets and (not flags or bool(told))

        await self.socket_table.wait_for(ready)

    async def broadcast(self, message: Any) -> None:
        """Send ``message`` (a whole JSON message) to every registered socket."""
        await self._send_text(json.dumps(message), None)

    async def send_json(self, sid: str, message: Any) -> None:
        await self._send_text(json.dumps(message), sid)

    async def send_binary(self, sid: str | None, data: bytes) -> None:
        await self.socket_table.send_bytes(data, sid)

    def reset(self) -> None:
        """Clear the request logs (state such as queue and history stays)."""
        self.received.clear()
        self.ws_received.clear()

    def add_model(self, folder: str, name: str, metadata: dict[str, str] | None = None) -> str:
        """Create a tiny safetensors-shaped model file (so combos like ckpt_name validate)."""
        path = os.path.join(self.paths.model_dirs(folder)[0], name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        header = json.dumps({"__metadata__": metadata or {"fake": "true"}}).encode()
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header)
        return path

    # -- helpers used by the route modules ----------------------------------------------
    def server_features(self) -> dict[str, Any]:
        """``comfy_api/feature_flags.get_server_features`` (0.3.64)."""
        return {"supports_preview_metadata": True, "max_upload_size": self.max_upload_size}

    def argv(self) -> list[str]:
        return ["main.py", "--cpu", "--listen", self.host, "--port", str(self.port)]

    def log(self, message: str) -> None:
        self.logs.append((datetime.datetime.now().isoformat(), message))
        del self.logs[:-300]

    async def _send_text(self, text: str, sid: str | None) -> None:
        targets = (
            list(self.sockets.values())
            if sid is None
            else [ws for s, ws in self.sockets.items() if s == sid]
        )
        for ws in targets:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(text)

    def _ensure_example_input(self) -> None:
        example = os.path.join(self.paths.input, "example.png")
        if not os.path.exists(example):
            images.solid(64, 64, 0x808080).save(example)

    # -- app ---------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        middlewares: list[Middleware] = [
            make_faults(self),
            cast(Middleware, cache_control),
            *([cast(Middleware, compress_body)] if self.compress_responses else []),
            make_origin_only(self),
        ]
        if self.record:
            middlewares = [make_record(self), *middlewares, cast(Middleware, read_body)]
        app = web.Application(client_max_size=self.max_upload_size, middlewares=middlewares)
        routes = web.RouteTableDef()

        @routes.get("/ws")
        async def ws(request: web.Request) -> web.WebSocketResponse:
            response = await websocket_handler(self, request)
            return response

        frontend_module.add_routes(self, routes)
        queue_routes.add_routes(self, routes)
        queue_routes.add_jobs_routes(self, routes)
        files.add_routes(self, routes)
        userdata.add_routes(self, routes)
        app.add_subapp("/internal", frontend_module.internal_app(self))
        api_routes = web.RouteTableDef()
        for route in routes:
            if isinstance(route, web.RouteDef):
                api_routes.route(route.method, "/api" + route.path)(route.handler, **route.kwargs)
        app.add_routes(api_routes)
        app.add_routes(routes)
        app.add_routes(self._control_routes())
        app.add_routes(frontend_module.static_routes(self))
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.queue.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        for ws in list(self.sockets.values()):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.queue.stop()

    def _control_routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()

        @routes.post("/__fake__/reset")
        async def reset(request: web.Request) -> web.Response:
            self.reset()
            return web.json_response({"reset": True})

        @routes.post("/__fake__/ws_stream")
        async def ws_stream(request: web.Request) -> web.Response:
            body = await request.json()
            sid = body.get("sid")
            count, size = int(body.get("count", 1)), int(body.get("size", 1024))
            kind, interval = int(body.get("type", 1)), float(body.get("interval_ms", 0))
            frame = stream_frame(kind, size, str(body.get("prompt_id") or _STREAM_PROMPT_ID))
            started = time.perf_counter()
            sent = 0
            for n in range(count):
                targets = (
                    list(self.sockets.values())
                    if sid is None
                    else [ws for s, ws in self.sockets.items() if s == sid]
                )
                for target in targets:
                    try:
                        await target.send_bytes(frame)
                        sent += 1
                    except (ConnectionError, RuntimeError):
                        pass
                if interval > 0 and n + 1 < count:
                    await asyncio.sleep(interval / 1000)
            return web.json_response({"sent": sent, "seconds": time.perf_counter() - started})

        return routes


_STREAM_PROMPT_ID = "00000000-0000-4000-8000-000000000000"


def stream_frame(kind: int, size: int, prompt_id: str = _STREAM_PROMPT_ID) -> bytes:
    """A preview frame of exactly ``size`` bytes: valid header + a padded JPEG (type 4: its
    metadata names ``prompt_id``)."""
    if kind == PREVIEW_IMAGE_WITH_METADATA:
        meta = {
            "node_id": "3",
            "prompt_id": prompt_id,
            "display_node_id": "3",
            "parent_node_id": None,
            "real_node_id": "3",
            "image_type": "image/jpeg",
        }
        head = encode_preview_with_metadata(b"", meta)
        return head + images.filler_jpeg(size - len(head))
    assert kind == PREVIEW_IMAGE, "type must be 1 or 4"
    head = encode_preview(b"", "JPEG")
    return head + images.filler_jpeg(size - len(head))
