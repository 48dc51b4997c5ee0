"""``/ws`` and ``/api/ws``: ComfyUI's socket routing table and binary frame layouts.

Imitates ``PromptServer.websocket_handler`` and ``send``/``send_json``/``send_bytes`` of ComfyUI
0.3.64 (docs/comfyui-protocol.md#connect-and-clientid-takeover,
docs/comfyui-protocol.md#client-to-server-messages, docs/comfyui-protocol.md#binary-frames;
captures/origin-and-ws-edge-cases.json, run-ws-binary.json, run-progress-text.json,
run-tiny-model-ksampler.json):

* ``clientId`` given: any socket registered under that sid is dropped from the table (not
  closed) and the new one takes over; when *any* socket of that sid closes, the sid is removed.
* no ``clientId``: ``uuid4().hex`` is minted.
* first message to the socket: ``status`` with ``sid``; if that sid is the one whose prompt is
  executing, also ``executing {node}``.
* first text frame ``{"type":"feature_flags"}`` stores the client's flags and is answered with the
  server flags; everything else is recorded and ignored.
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from .server import FakeComfyUI

PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

IMAGE_FORMAT_NUM = {"JPEG": 1, "PNG": 2}


def encode_preview(image_bytes: bytes, fmt: str) -> bytes:
    """Type 1: ``uint32 1`` + ``uint32 image_format`` (1 JPEG, 2 PNG) + image bytes."""
    return struct.pack(">II", PREVIEW_IMAGE, IMAGE_FORMAT_NUM[fmt]) + image_bytes


def encode_preview_with_metadata(image_bytes: bytes, metadata: dict[str, Any]) -> bytes:
    """Type 4: ``uint32 4`` + ``uint32 len(json)`` + metadata JSON + image bytes."""
    meta = json.dumps(metadata).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image_bytes


def encode_text(node_id: str, text: str) -> bytes:
    """Type 3: ``uint32 3`` + ``uint32 len(node_id)`` + node id + UTF-8 text."""
    nid = node_id.encode()
    return struct.pack(">II", TEXT, len(nid)) + nid + text.encode()


async def _send_catch(send: Callable[[], Awaitable[None]]) -> None:
    """``send_socket_catch_exception``: a dead socket must not break the sender."""
    try:
        await send()
    except (ConnectionError, RuntimeError) as exc:  # closing / closed transport
        del exc


class SocketTable:
    """``PromptServer.sockets`` + ``sockets_metadata`` and the send helpers."""

    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.metadata: dict[str, dict[str, Any]] = {}
        self._changed: asyncio.Condition | None = None

    async def changed(self) -> None:
        """Fake-only: wake :meth:`wait_for` (a socket registered, told its flags, or left)."""
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Fake-only: until ``predicate()`` holds (checked after every socket change)."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(predicate)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        """``feature_flags.supports_feature(..., "supports_preview_metadata")``."""
        if sid is None:
            return False
        flags = self.metadata.get(sid, {}).get("feature_flags", {})
        return bool(isinstance(flags, dict) and flags.get("supports_preview_metadata") is True)

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        """``{"type": event, "data": data}`` to ``sid``, or to every socket when ``sid`` is None."""
        text = json.dumps({"type": event, "data": data})
        if sid is None:
            for ws in list(self.sockets.values()):
                await _send_catch(lambda ws=ws: ws.send_str(text))  # type: ignore[misc]
        elif sid in self.sockets:
            ws = self.sockets[sid]
            await _send_catch(lambda: ws.send_str(text))

    async def send_bytes(self, message: bytes, sid: str | None = None) -> None:
        """An already framed binary message to ``sid`` or to every socket."""
        if sid is None:
            for ws in list(self.sockets.values()):
                await _send_catch(lambda ws=ws: ws.send_bytes(message))  # type: ignore[misc]
        elif sid in self.sockets:
            ws = self.sockets[sid]
            await _send_catch(lambda: ws.send_bytes(message))


async def websocket_handler(fake: FakeComfyUI, request: web.Request) -> web.WebSocketResponse:
    """The handler itself; routing semantics as in the module docstring."""
    table = fake.socket_table
    ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
    await ws.prepare(request)
    sid = request.rel_url.query.get("clientId", "")
    if sid:
        table.sockets.pop(sid, None)
    else:
        sid = uuid.uuid4().hex
    table.sockets[sid] = ws
    table.metadata[sid] = {"feature_flags": {}}
    await table.changed()
    try:
        await table.send_json("status", {"status": fake.queue.queue_info(), "sid": sid}, sid)
        if fake.queue.client_id == sid and fake.queue.last_node_id is not None:
            await table.send_json("executing", {"node": fake.queue.last_node_id}, sid)
        first_message = True
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                fake.ws_received.append((sid, "text", msg.data))
                try:
                    data = json.loads(msg.data)
                except json.JSONDecodeError:
                    continue
                if not isinstance(data, dict):  # ComfyUI's .get() raises; first_message stays
                    continue
                if first_message and data.get("type") == "feature_flags":
                    flags = data.get("data", {})
                    table.metadata.setdefault(sid, {})["feature_flags"] = flags
                    await table.send_json("feature_flags", fake.server_features(), sid)
                    await table.changed()
                first_message = False
            elif msg.type == WSMsgType.BINARY:
                fake.ws_received.append((sid, "binary", msg.data))
    finally:
        table.sockets.pop(sid, None)
        table.metadata.pop(sid, None)
        await table.changed()
    return ws
