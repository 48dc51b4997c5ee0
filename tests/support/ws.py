"""Reading what a relayed WebSocket delivered."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def frames_until(ws: aiohttp.ClientWebSocketResponse, marker: Any) -> list[Any]:
    """Every frame up to ``marker`` (a JSON message broadcast last, so everything before it was
    relayed): text frames as parsed JSON, binary frames as ``("binary", type)``."""
    seen: list[Any] = []
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type is aiohttp.WSMsgType.BINARY:
            seen.append(("binary", int.from_bytes(msg.data[:4], "big")))
            continue
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data == marker:
            return seen
        seen.append(data)


async def greeted(ws: aiohttp.ClientWebSocketResponse, *, flags: bool = True) -> str:
    """Reads the connect-time ``status`` of a fresh socket and, with ``flags``, exchanges the
    stock UI's feature flags; returns the sid the status told it."""
    status = await ws.receive_json(timeout=10)
    assert status["type"] == "status"
    if flags:
        await ws.send_str(
            json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        )
        assert (await ws.receive_json(timeout=10))["type"] == "feature_flags"
    return str(status["data"]["sid"])


def kinds(frames: list[Any]) -> list[Any]:
    """The type of each frame of :func:`frames_until` (binary ones as they are)."""
    return [f if isinstance(f, tuple) else f["type"] for f in frames]


def prompt_ids(frames: list[Any]) -> set[str]:
    """The prompt ids the JSON frames name."""
    return {
        f["data"]["prompt_id"]
        for f in frames
        if isinstance(f, dict) and isinstance(f.get("data"), dict) and "prompt_id" in f["data"]
    }
